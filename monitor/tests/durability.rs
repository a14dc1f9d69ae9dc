//! Events sent while the monitor is down are not lost: the monitor is stopped, 200 tasks run on a
//! Rust worker with task events on, the monitor starts again and shows all 200 as SUCCESS.

mod support;

use std::time::{Duration, Instant};

use monitor::Monitor;
use serde_json::json;
use support::{TestWorker, eventually, get_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_while_the_monitor_is_down_are_all_there_when_it_is_back() {
    const TASKS: usize = 200;
    let (config, db) = support::config();
    // The first start declares the events queue; from then on RabbitMQ keeps the events.
    let first = Monitor::start(&config).await.expect("the monitor starts");
    eventually("the intake to consume", Duration::from_secs(30), || async {
        first.state().intake_status().consuming().then_some(())
    })
    .await;
    first.stop().await.unwrap();

    let queue = format!("test.{}", support::unique("monitor-down"));
    let worker = TestWorker::start(&queue, 8).await;
    let node = worker.hostname.clone();
    let client = support::client(&queue).await;
    let mut sent = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        let r = client
            .send_task("diag.add", vec![json!(i), json!(1)], Default::default())
            .send()
            .await
            .unwrap();
        sent.push(r);
    }
    for (i, r) in sent.iter().enumerate() {
        assert_eq!(r.get(Duration::from_secs(60)).await.unwrap(), json!(i + 1));
    }
    worker.stop().await;

    // The events wait in the queue with nobody reading it: one message per event, or lists of
    // them (`task.multi`) from a worker that batches its events.
    let probe = monitor::broker::QueueProbe::new(support::amqp_url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let stats = probe.stats(&config.events_queue).await.unwrap();
        if let Some(s) = stats
            && s.messages > 0
            && s.consumers == 0
        {
            break s.messages;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no events waited in the events queue within 30 s: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    let started = Instant::now();
    let second = Monitor::start(&config)
        .await
        .expect("the monitor starts again");
    let router = second.router();
    let ids: Vec<String> = sent.iter().map(|r| r.id().to_owned()).collect();
    let pool = second.state().store().pool().clone();
    eventually(
        "all 200 tasks to be stored as SUCCESS",
        Duration::from_secs(60),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM tasks WHERE uuid = ANY($1) AND state = 'SUCCESS' \
                 AND name = 'diag.add'",
            )
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == TASKS as i64).then_some(())
        },
    )
    .await;
    let caught_up = started.elapsed();
    let listed = get_json(
        &router,
        &format!("/api/tasks?workername={node}&state=SUCCESS&limit=1000"),
    )
    .await;
    let listed = listed.as_object().unwrap();
    assert_eq!(listed.len(), TASKS, "the API lists every task");
    for (i, id) in ids.iter().enumerate() {
        let t = &listed[id];
        assert_eq!(t["result"], json!((i + 1).to_string()), "{t}");
        assert_eq!(t["args"], json!(format!("({i}, 1)")), "{t}");
        assert!(
            t["received"].is_number() && t["succeeded"].is_number(),
            "{t}"
        );
    }
    eprintln!(
        "{waiting} event messages waited in {} while the monitor was down; all {TASKS} tasks \
         stored {caught_up:?} after it started again ({} events in {} batches)",
        config.events_queue,
        second.state().intake_status().events(),
        second.state().intake_status().batches(),
    );

    second.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    use task_core::Broker;
    client.broker().delete_queue(&queue).await.unwrap();
    support::drop_database(&db).await;
}
