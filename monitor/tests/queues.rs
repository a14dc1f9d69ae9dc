//! Every queue through RabbitMQ's management API (`MONITOR_BROKER_API`), against the real
//! broker: a queue nobody consumes is listed with its ready and unacknowledged counts, the age of
//! its oldest message (from the message's `timestamp` property), and its dead letters; in
//! `/metrics` (the names KEDA and the alerts use), `/api/queues/length` and the Queues page.

mod support;

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use monitor::Monitor;
use serde_json::json;
use support::{call, eventually, get_json};

fn broker_api() -> String {
    std::env::var("BROKER_API_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672/api/".into())
}

/// Declares `queue` and publishes `n` persistent messages stamped `age` seconds ago (no stamp
/// when `None`, as kombu publishes).
async fn fill(conn: &Connection, queue: &str, n: usize, age: Option<u64>) {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for _ in 0..n {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(age) = age {
            props = props.with_timestamp(now - age);
        }
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{}",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    ch.close(200, "ok".into()).await.unwrap();
}

/// The value of `name{queue="<queue>"}` (`tq_queue_messages` is read with `state="ready"`).
fn metric(text: &str, name: &str, queue: &str) -> Option<f64> {
    let labels = if name == "tq_queue_messages" {
        format!("{{queue=\"{queue}\",state=\"ready\"}} ")
    } else {
        format!("{{queue=\"{queue}\"}} ")
    };
    let prefix = format!("{name}{labels}");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queue_is_seen_with_its_oldest_message_age_and_dead_letters() {
    let (mut config, db) = support::config();
    config.broker_api = Some(broker_api());
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let conn = Connection::connect(&support::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let stamped = format!("test.{}", support::unique("queues-stamped"));
    let plain = format!("test.{}", support::unique("queues-plain"));
    let dlq = format!("{stamped}.dlq");
    fill(&conn, &stamped, 3, Some(90)).await;
    fill(&conn, &plain, 2, None).await;
    fill(&conn, &dlq, 4, Some(10)).await;
    // task-core's own client stamps what it publishes.
    let sent_by_rust = format!("test.{}", support::unique("queues-rust"));
    let client = support::client(&sent_by_rust).await;
    client
        .send_task("diag.add", vec![json!(1), json!(2)], Default::default())
        .send()
        .await
        .unwrap();

    // The broker emits queue statistics every few seconds; the monitor caches them for 5 s.
    let text = eventually(
        "the three queues and their ages in /metrics",
        Duration::from_secs(40),
        || async {
            let (_, text) = call(&router, "GET", "/metrics", "").await;
            (metric(&text, "tq_queue_messages", &stamped) == Some(3.0)
                && metric(&text, "tq_queue_messages", &plain) == Some(2.0)
                && metric(&text, "tq_dead_letter_messages", &stamped) == Some(4.0)
                && metric(&text, "tq_queue_messages", &sent_by_rust) == Some(1.0)
                // The head message's timestamp can reach the statistics a round after the counts.
                && metric(&text, "tq_queue_oldest_message_age_seconds", &stamped).is_some()
                && metric(&text, "tq_queue_oldest_message_age_seconds", &sent_by_rust).is_some())
            .then_some(text)
        },
    )
    .await;
    let age = metric(&text, "tq_queue_oldest_message_age_seconds", &stamped).expect("an age");
    assert!((90.0..200.0).contains(&age), "age {age}\n{text}");
    let rust_age = metric(&text, "tq_queue_oldest_message_age_seconds", &sent_by_rust)
        .expect("a message from task-core's client carries its timestamp");
    assert!((0.0..60.0).contains(&rust_age), "age {rust_age}");
    assert_eq!(
        metric(&text, "tq_queue_oldest_message_age_seconds", &plain),
        None,
        "no timestamp, no age"
    );
    assert!(
        text.contains(&format!(
            "tq_queue_messages{{queue=\"{stamped}\",state=\"unacked\"}} 0"
        )),
        "{text}"
    );
    assert_eq!(metric(&text, "tq_queue_consumers", &stamped), Some(0.0));
    // A dead-letter queue is counted as its queue's dead letters, not as a queue of its own.
    assert_eq!(metric(&text, "tq_queue_messages", &dlq), None);

    // Flower's shape, with the management API's fields as Flower passes them through.
    let lengths = get_json(&router, "/api/queues/length").await;
    let ours = lengths["active_queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == stamped.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{stamped} in {lengths}"));
    assert_eq!(ours["messages"], 3, "{ours}");
    assert_eq!(ours["messages_ready"], 3, "{ours}");
    assert_eq!(ours["messages_unacknowledged"], 0, "{ours}");
    assert_eq!(ours["consumers"], 0, "{ours}");

    // Filtered by name (a vhost can hold thousands; the page shows 200 at a time).
    let (status, html) = call(&router, "GET", "/queues?name=test.queues-", "").await;
    assert_eq!(status, 200);
    assert!(html.contains(&plain), "the unconsumed queue is listed");
    assert!(
        !html.contains(&config.events_queue),
        "the filter leaves others out"
    );
    assert!(html.contains("Every queue of the virtual host"), "{html}");
    assert!(
        html.contains(" min "),
        "the stamped queue's age is shown: {html}"
    );

    for q in [&stamped, &plain, &dlq, &sent_by_rust] {
        support::delete_queue(q).await;
    }
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_management_api_is_reported_not_hidden() {
    let (mut config, db) = support::config();
    config.broker_api = Some("http://guest:guest@127.0.0.1:9/api/".into());
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let (status, html) = call(&router, "GET", "/queues", "").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("RabbitMQ management API http://guest:***@127.0.0.1:9/api/")
            || html.contains("RabbitMQ management API http://127.0.0.1:9/api/"),
        "{html}"
    );
    let (status, body) = call(&router, "GET", "/api/queues/length", "").await;
    assert!(status.is_server_error(), "{status} {body}");
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
