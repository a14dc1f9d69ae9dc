//! Tasks that block a thread, against the real RabbitMQ and Redis: through
//! `task_core::blocking::run_blocking` they leave the worker's runtime free, so the other tasks'
//! acknowledgements and the connection's heartbeats keep going; and a hard time limit stops
//! waiting for them.

mod common;

use std::time::{Duration, Instant};

use task_core::diag::{self, AddArgs, BlockArgs};
use task_core::{AmqpBroker, Broker, Client, TaskState};

/// A broker handle whose connections must see a heartbeat every 2 s (RabbitMQ closes one that
/// stays silent for two intervals).
async fn amqp_with_short_heartbeat() -> AmqpBroker {
    let url = format!("{}?heartbeat=2", common::amqp_url());
    AmqpBroker::connect(&url).await.unwrap()
}

/// Messages of `queue` delivered and not yet acknowledged, as RabbitMQ counts them.
fn unacknowledged(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl (the RabbitMQ server package) is installed");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(queue)).then(|| f.next()?.parse().ok())?
    })
}

/// More blocking tasks than the test runtime has threads (2), each blocking for five heartbeat
/// intervals: without `run_blocking` they would hold every runtime thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_tasks_leave_acks_and_heartbeats_running() {
    const BLOCKERS: usize = 4;
    const ADDS: i64 = 40;
    let queue = common::unique_queue("blocking");
    let broker = amqp_with_short_heartbeat().await;
    let backend = common::redis().await;
    let worker = common::RunningWorker::start(
        common::config(&queue),
        common::diag_registry(),
        broker.clone(),
        backend.clone(),
    );
    let client = Client::new(broker.clone(), backend).with_default_queue(&queue);

    let mut blockers = Vec::new();
    for _ in 0..BLOCKERS {
        let r = client
            .task::<diag::Block>(BlockArgs { ms: 10_000 })
            .send()
            .await
            .unwrap();
        blockers.push(r);
    }
    common::eventually(
        "every blocker delivered to the worker",
        Duration::from_secs(30),
        || async { (client.broker().queue_length(&queue).await.ok()? == 0).then_some(()) },
    )
    .await;
    let start = Instant::now();
    let mut adds = Vec::new();
    for i in 0..ADDS {
        adds.push((
            i,
            client
                .task::<diag::Add>(AddArgs::new(i, 1))
                .send()
                .await
                .unwrap(),
        ));
    }
    for (i, r) in &adds {
        assert_eq!(
            r.get(Duration::from_secs(60)).await.unwrap(),
            (i + 1).into()
        );
    }
    let adds_took = start.elapsed();
    for b in &blockers {
        assert_eq!(
            b.state().await.unwrap(),
            TaskState::Pending,
            "the adds finished while every blocker still blocked (adds took {adds_took:?})"
        );
    }
    // Acknowledged, not just stored: only the blockers' deliveries are outstanding.
    let unacked = tokio::task::spawn_blocking({
        let queue = queue.clone();
        move || unacknowledged(&queue)
    })
    .await
    .unwrap();
    assert_eq!(unacked, Some(BLOCKERS as u64), "unacknowledged deliveries");

    for b in &blockers {
        let blocked_ms = b.get(Duration::from_secs(60)).await.unwrap();
        assert!(blocked_ms >= 10_000, "blocked {blocked_ms} ms");
    }
    assert_eq!(broker.reconnects(), 0, "the connections stayed up");
    let stats = worker.stop().await;
    assert_eq!(
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing was redelivered"
    );
    assert_eq!(
        stats.received.load(std::sync::atomic::Ordering::Relaxed),
        BLOCKERS as u64 + ADDS as u64,
        "each message was delivered once"
    );
    client.broker().delete_queue(&queue).await.unwrap();
    println!(
        "{ADDS} adds done in {adds_took:?} while {BLOCKERS} tasks blocked threads for 10 s; {unacked:?} unacknowledged; 0 reconnects"
    );
}

/// A hard time limit reports the blocked task as TimeLimitExceeded when it passes, not when the
/// thread lets go, and frees its slot for the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_time_limit_stops_waiting_for_a_blocked_thread() {
    let queue = common::unique_queue("blocking-limit");
    let broker = amqp_with_short_heartbeat().await;
    let backend = common::redis().await;
    let mut config = common::config(&queue);
    config.concurrency = 1;
    let worker = common::RunningWorker::start(
        config,
        common::diag_registry(),
        broker.clone(),
        backend.clone(),
    );
    let client = Client::new(broker.clone(), backend).with_default_queue(&queue);
    let start = Instant::now();
    let blocked = client
        .task::<diag::Block>(BlockArgs { ms: 60_000 })
        .time_limits(None, Some(Duration::from_secs(1)))
        .send()
        .await
        .unwrap();
    let after = client
        .task::<diag::Add>(AddArgs::new(2, 3))
        .send()
        .await
        .unwrap();
    let err = blocked.get(Duration::from_secs(50)).await.unwrap_err();
    let limited_after = start.elapsed();
    match &err {
        task_core::Error::TaskFailed { exception, .. } => {
            assert_eq!(exception.exc_type, "TimeLimitExceeded", "{err}");
        }
        other => panic!("expected a time limit, got {other:?}"),
    }
    assert!(limited_after >= Duration::from_secs(1));
    // The one slot is free again although the 60 s sleep was never finished.
    assert_eq!(
        after.get(Duration::from_secs(50)).await.unwrap(),
        serde_json::Number::from(5)
    );
    // diag.block checks its cancel handle: its thread lets go as well.
    common::eventually(
        "the abandoned blocking thread to return",
        Duration::from_secs(10),
        || async { (task_core::blocking::abandoned() == 0).then_some(()) },
    )
    .await;
    assert_eq!(broker.reconnects(), 0);
    worker.stop().await;
    client.broker().delete_queue(&queue).await.unwrap();
    println!(
        "TimeLimitExceeded reported {limited_after:?} after sending a 60 s block with a 1 s limit"
    );
}
