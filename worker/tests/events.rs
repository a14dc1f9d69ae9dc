//! The worker's Celery events as Celery itself reads them: `examples/python/capture_events.py`
//! captures from `celeryev` with Celery's `EventReceiver` and feeds a `celery.events.State`, as
//! Flower does, while the worker binary runs one task of each outcome.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use task_core::diag::{self, FlakyArgs};
use task_core::{Broker, Client, Error, TaskState};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// The Python capture, printing `ready` and then one JSON document.
struct Capture {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: std::path::PathBuf,
}

impl Capture {
    /// Starts watching `node` and returns once the receiver queue is bound.
    async fn start(node: &str, timeout: Duration) -> Self {
        let stderr =
            std::env::temp_dir().join(format!("capture-{}.log", uuid::Uuid::new_v4().simple()));
        let mut child = tokio::process::Command::new(common::python())
            .arg(common::workspace_root().join("examples/python/capture_events.py"))
            // kombu spells the default vhost `//`.
            .arg(common::amqp_url().replace("/%2f", "//"))
            .arg(node)
            .arg(timeout.as_secs().to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("capture log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start capture_events.py");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut capture = Capture {
            child,
            lines,
            stderr,
        };
        let first = tokio::time::timeout(Duration::from_secs(30), capture.lines.next_line()).await;
        let first = first.ok().and_then(|l| l.ok()).flatten();
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "capture_events.py did not get ready: {}",
            capture.stderr_text()
        );
        capture
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (up to `timeout`) for the JSON document printed on exit.
    async fn finish(mut self, timeout: Duration) -> Value {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok())
            .flatten()
            .unwrap_or_else(|| panic!("no output from the capture: {}", self.stderr_text()));
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        // Kept for reading when an assertion below fails.
        let saved = self.stderr.with_extension("json");
        let _ = std::fs::write(&saved, &line);
        eprintln!("captured events: {}", saved.display());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("capture printed {line:?}: {e}"))
    }
}

/// Asserts that `event` has every one of `fields` (present, possibly null).
fn assert_fields(event: &Value, fields: &[&str]) {
    for field in fields {
        assert!(
            event.get(*field).is_some(),
            "{} lacks `{field}`: {event}",
            event["type"]
        );
    }
}

/// The fields every event carries (reference §4.1).
const COMMON: &[&str] = &["type", "hostname", "timestamp", "utcoffset", "pid", "clock"];
/// What worker events carry (§4.2).
const WORKER: &[&str] = &[
    "freq",
    "active",
    "processed",
    "loadavg",
    "sw_ident",
    "sw_ver",
    "sw_sys",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerys_receiver_and_state_read_every_event_of_a_run() {
    let queue = common::unique_queue("events");
    let node = format!("events-{}@test", uuid::Uuid::new_v4().simple());
    let capture = Capture::start(&node, Duration::from_secs(90)).await;
    let mut worker = common::WorkerProcess::spawn(
        &queue,
        &[
            ("WORKER_HOSTNAME", &node),
            ("WORKER_SEND_TASK_EVENTS", "true"),
        ],
    );
    worker.ready().await;
    let worker_pid = worker.child.id().expect("worker pid");
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue)
        .with_sent_events();

    let add = client
        .send_task("diag.add", vec![json!(2), json!(3)], Map::new())
        .send()
        .await
        .unwrap();
    let fail = client
        .send_task("diag.fail", vec![json!("boom")], Map::new())
        .send()
        .await
        .unwrap();
    let flaky = client
        .task::<diag::Flaky>(FlakyArgs { fails: 1 })
        .send()
        .await
        .unwrap();
    let expired = client
        .send_task("diag.add", vec![json!(1), json!(1)], Map::new())
        .expires_at((SystemTime::now() - Duration::from_secs(60)).into())
        .send()
        .await
        .unwrap();
    let unknown = client
        .send_task("diag.no_such_task", vec![json!(1)], Map::new())
        .send()
        .await
        .unwrap();
    let wait = Duration::from_secs(30);
    assert_eq!(add.get(wait).await.unwrap(), json!(5));
    assert_eq!(flaky.get(wait).await.unwrap(), json!(1));
    let failed_state = |r: Result<Value, Error>| match r {
        Err(Error::TaskFailed {
            state, exception, ..
        }) => (state, exception.exc_type),
        other => panic!("expected a failed task, got {other:?}"),
    };
    assert_eq!(
        failed_state(fail.get(wait).await),
        (TaskState::Failure, "ValueError".into())
    );
    assert_eq!(failed_state(expired.get(wait).await).0, TaskState::Revoked);
    assert_eq!(
        failed_state(unknown.get(wait).await),
        (TaskState::Failure, "NotRegistered".into())
    );

    worker.signal("TERM");
    let exited = tokio::time::timeout(Duration::from_secs(30), worker.child.wait()).await;
    assert!(
        exited.is_ok_and(|s| s.is_ok_and(|s| s.success())),
        "the worker did not stop cleanly on SIGTERM: {}",
        worker.log_text()
    );
    let seen = capture.finish(Duration::from_secs(60)).await;
    let broker = client.broker();
    broker.delete_queue(&queue).await.unwrap();
    let dlq = task_core::broker::dead_letter_queue(&queue);
    broker.delete_queue(&dlq).await.unwrap();

    let events = seen["events"].as_array().expect("events").clone();
    let of = |kind: &str, id: Option<&str>| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["type"] == kind && id.is_none_or(|id| e["uuid"] == id))
            .cloned()
            .collect()
    };
    let one = |kind: &str, id: &str| -> Value {
        let found = of(kind, Some(id));
        assert_eq!(found.len(), 1, "one {kind} for {id}, got {found:?}");
        found[0].clone()
    };
    let position = |kind: &str, id: &str| {
        events
            .iter()
            .position(|e| e["type"] == kind && e["uuid"] == id)
            .unwrap_or_else(|| panic!("no {kind} for {id}"))
    };

    // Common fields, on every event; the node's own clock only moves forward.
    let client_node = format!("gen{}@{}", std::process::id(), task_core::hostname());
    let mut last_clock = 0;
    for e in &events {
        assert_fields(e, COMMON);
        assert!(e["timestamp"].is_f64(), "timestamp is a float: {e}");
        assert!(e["utcoffset"].is_number() && e["pid"].is_u64(), "{e}");
        if e["type"] == "task-sent" {
            assert_eq!(e["hostname"], client_node.as_str(), "{e}");
            assert_eq!(e["pid"], std::process::id(), "{e}");
        } else {
            assert_eq!(e["hostname"], node.as_str(), "{e}");
            assert_eq!(e["pid"], worker_pid, "{e}");
            let clock = e["clock"].as_u64().expect("integer clock");
            assert!(clock > last_clock, "clock went back to {clock}: {e}");
            last_clock = clock;
        }
    }

    // Worker events.
    let node_events: Vec<&Value> = events.iter().filter(|e| e["hostname"] == node).collect();
    assert_eq!(
        node_events.first().map(|e| &e["type"]),
        Some(&json!("worker-online"))
    );
    assert_eq!(
        node_events.last().map(|e| &e["type"]),
        Some(&json!("worker-offline"))
    );
    for kind in ["worker-online", "worker-heartbeat", "worker-offline"] {
        let found = of(kind, None);
        assert!(!found.is_empty(), "no {kind} in {events:?}");
        for e in &found {
            assert_fields(e, WORKER);
            assert_eq!(e["freq"], 2.0, "{e}");
            assert_eq!(e["sw_sys"], "Linux", "{e}");
            assert!(e["sw_ident"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
            assert_eq!(e["loadavg"].as_array().map(Vec::len), Some(3), "{e}");
        }
    }
    let offline = of("worker-offline", None).remove(0);
    assert_eq!(offline["active"], 0, "{offline}");
    assert!(offline["processed"].as_u64() >= Some(4), "{offline}");

    // Task events: each type, with the fields Flower reads.
    let (add_id, fail_id, flaky_id) = (add.id(), fail.id(), flaky.id());
    let (expired_id, unknown_id) = (expired.id(), unknown.id());
    for id in [add_id, fail_id, flaky_id, expired_id, unknown_id] {
        let sent = one("task-sent", id);
        assert_fields(
            &sent,
            &[
                "uuid",
                "root_id",
                "parent_id",
                "name",
                "args",
                "kwargs",
                "retries",
                "eta",
                "expires",
                "queue",
                "exchange",
                "routing_key",
            ],
        );
        assert_eq!(sent["queue"], queue.as_str());
        assert_eq!(sent["routing_key"], queue.as_str());
    }
    assert_eq!(one("task-sent", add_id)["args"], "(2, 3)");
    assert_eq!(one("task-sent", unknown_id)["name"], "diag.no_such_task");
    assert!(one("task-sent", expired_id)["expires"].is_string());

    const RECEIVED: &[&str] = &[
        "uuid",
        "name",
        "args",
        "kwargs",
        "root_id",
        "parent_id",
        "retries",
        "eta",
        "expires",
    ];
    let received = one("task-received", add_id);
    assert_fields(&received, RECEIVED);
    assert_eq!(received["name"], "diag.add");
    assert_eq!(received["args"], "(2, 3)");
    assert_eq!(received["kwargs"], "{}");
    assert_eq!(received["retries"], 0);
    assert_fields(&one("task-started", add_id), &["uuid"]);
    let succeeded = one("task-succeeded", add_id);
    assert_fields(&succeeded, &["uuid", "result", "runtime"]);
    assert_eq!(succeeded["result"], "5", "result is a repr string");
    assert!(succeeded["runtime"].as_f64() > Some(0.0), "{succeeded}");
    assert!(position("task-received", add_id) < position("task-started", add_id));
    assert!(position("task-started", add_id) < position("task-succeeded", add_id));

    let failed = one("task-failed", fail_id);
    assert_fields(&failed, &["uuid", "exception", "traceback"]);
    assert_eq!(failed["exception"], "ValueError('boom')");
    let traceback = failed["traceback"].as_str().expect("traceback text");
    assert!(
        traceback.starts_with("Traceback") && traceback.contains("ValueError: boom"),
        "{traceback}"
    );

    let retried = one("task-retried", flaky_id);
    assert_fields(&retried, &["uuid", "exception", "traceback"]);
    assert!(retried["traceback"].is_string(), "{retried}");
    let flaky_received = of("task-received", Some(flaky_id));
    assert_eq!(flaky_received.len(), 2, "{flaky_received:?}");
    assert_eq!(flaky_received[0]["kwargs"], "{'fails': 1}");
    assert_eq!(flaky_received[1]["retries"], 1);
    let retry_received = events
        .iter()
        .position(|e| e["type"] == "task-received" && e["uuid"] == flaky_id && e["retries"] == 1)
        .expect("the retry's task-received");
    assert!(
        position("task-retried", flaky_id) < retry_received,
        "task-retried must come before the next attempt, or Celery's state ends at RETRY"
    );
    assert_eq!(of("task-started", Some(flaky_id)).len(), 2);
    assert_eq!(one("task-succeeded", flaky_id)["result"], "1");

    let revoked = one("task-revoked", expired_id);
    assert_fields(&revoked, &["uuid", "terminated", "signum", "expired"]);
    assert_eq!(revoked["expired"], true);
    assert_eq!(revoked["terminated"], false);
    assert!(of("task-started", Some(expired_id)).is_empty());

    let rejected = one("task-rejected", unknown_id);
    assert_fields(&rejected, &["uuid", "requeue"]);
    assert_eq!(rejected["requeue"], false);

    // Celery's State, as Flower would show it.
    let task = |id: &str| seen["tasks"][id].clone();
    let t = task(add_id);
    assert_eq!(t["name"], "diag.add", "{t}");
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert!(t["runtime"].as_f64() > Some(0.0), "{t}");
    assert_eq!(t["args"], "(2, 3)", "{t}");
    assert_eq!(t["kwargs"], "{}", "{t}");
    assert_eq!(t["result"], "5", "{t}");
    assert_eq!(t["worker"], node.as_str(), "{t}");
    assert_eq!(t["client"], client_node.as_str(), "{t}");

    let t = task(fail_id);
    assert_eq!(t["name"], "diag.fail", "{t}");
    assert_eq!(t["state"], "FAILURE", "{t}");
    assert_eq!(t["args"], "('boom',)", "{t}");
    assert_eq!(t["exception"], "ValueError('boom')", "{t}");
    assert!(t["traceback"].is_string(), "{t}");

    let t = task(flaky_id);
    assert_eq!(t["name"], "diag.flaky", "{t}");
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["kwargs"], "{'fails': 1}", "{t}");
    assert_eq!(t["retries"], 1, "{t}");
    assert_eq!(t["result"], "1", "{t}");

    let t = task(expired_id);
    assert_eq!(t["name"], "diag.add", "{t}");
    assert_eq!(t["state"], "REVOKED", "{t}");

    let t = task(unknown_id);
    assert_eq!(t["state"], "REJECTED", "{t}");
    assert_eq!(t["name"], "diag.no_such_task", "{t}");

    let before = &seen["worker_before_offline"];
    assert_eq!(before["alive"], true, "{before}");
    assert_eq!(before["freq"], 2.0, "{before}");
    assert!(before["heartbeats"].as_u64() >= Some(1), "{before}");
    let after = &seen["worker"];
    assert_eq!(after["alive"], false, "{after}");
    assert_eq!(after["active"], 0, "{after}");
    assert_eq!(after["processed"], offline["processed"], "{after}");
}
