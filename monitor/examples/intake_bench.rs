//! How fast the event intake writes: fills the monitor's events queue with the events of N tasks
//! (task-received, task-started, task-succeeded, one message each, as a Rust worker sends them),
//! then starts the monitor and times until every event is committed. Prints events/s written and
//! the lag of the last batch.
//!
//! ```sh
//! cargo run -p monitor --example intake_bench              # 20,000 tasks, 60,000 events
//! cargo run -p monitor --example intake_bench -- 50000
//! ```
//! The events go straight to the bench's own queue (not through `celeryev`), so other monitors
//! on the broker do not see them. The database and the queue are removed at the end.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use monitor::{Config, Monitor};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    task_core::telemetry::init(task_core::telemetry::LogFormat::Pretty);
    let tasks: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let admin = std::env::var("DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = format!("monitor_bench_{}", uuid::Uuid::new_v4().simple());
    let mut config = Config::from_env()?;
    config.database_url = format!(
        "{}/{db}",
        admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)
    );
    config.events_queue = format!("bench.monitor.events-{}", uuid::Uuid::new_v4().simple());
    config.events_queue_expires = Some(Duration::from_secs(600));

    // Declare the queue, then fill it while nobody reads it.
    monitor::intake::declare(&config.intake()).await?;
    let connection = monitor::broker::connect(&config.broker_url).await?;
    let ch = connection.create_channel().await?;
    let node = "bench@monitor";
    let t0 = task_core::events::unix_now();
    let started = Instant::now();
    for i in 0..tasks {
        let id = uuid::Uuid::new_v4().to_string();
        let ts = t0 + i as f64 * 1e-4;
        let events = [
            json!({"type": "task-received", "uuid": id, "hostname": node, "timestamp": ts,
                "utcoffset": 0, "pid": 1, "clock": i, "name": "diag.add", "args": format!("({i}, 1)"),
                "kwargs": "{}", "root_id": id, "parent_id": null, "retries": 0, "eta": null,
                "expires": null}),
            json!({"type": "task-started", "uuid": id, "hostname": node, "timestamp": ts + 1e-5,
                "utcoffset": 0, "pid": 1, "clock": i}),
            json!({"type": "task-succeeded", "uuid": id, "hostname": node,
                "timestamp": ts + 2e-5, "utcoffset": 0, "pid": 1, "clock": i,
                "result": (i + 1).to_string(), "runtime": 1e-5}),
        ];
        for e in events {
            ch.basic_publish(
                "".into(),
                config.events_queue.as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&e)?,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(1),
            )
            .await?;
        }
    }
    let total = tasks as u64 * 3;
    let probe = monitor::broker::QueueProbe::new(config.broker_url.clone());
    while probe
        .stats(&config.events_queue)
        .await?
        .is_none_or(|s| s.messages < total)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{total} events of {tasks} tasks queued in {:.1?}",
        started.elapsed()
    );

    let started = Instant::now();
    let monitor = Monitor::start(&config).await?;
    let status = monitor.state().intake_status().clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    // Done when every task is stored as SUCCESS (the queue is bound to `celeryev` too, so it
    // also carries whatever else runs on this broker: counting events would stop early).
    loop {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM tasks WHERE state = 'SUCCESS' AND worker = $1")
                .bind(node)
                .fetch_one(monitor.state().store().pool())
                .await?;
        if n == tasks as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the intake did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    println!(
        "{total} events written in {took:.2?}: {:.0} events/s ({:.0} tasks/s); {} events in {} batches in all",
        total as f64 / took.as_secs_f64(),
        tasks as f64 / took.as_secs_f64(),
        status.events(),
        status.batches()
    );
    let odd: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT uuid, state, name FROM tasks WHERE state <> 'SUCCESS' OR name IS NULL LIMIT 5",
    )
    .fetch_all(monitor.state().store().pool())
    .await?;
    if !odd.is_empty() {
        println!("not SUCCESS: {odd:?}");
    }
    monitor.stop().await?;
    probe.delete(&config.events_queue).await?;
    let _ = connection.close(200, "done".into()).await;
    let admin = sqlx::PgPool::connect(&admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    Ok(())
}
