//! A message whose hand-off keeps failing is not spun through the queue: the worker waits longer
//! before each requeue and dead-letters it after a bounded number of tries, with a reason.
//!
//! Against the real RabbitMQ, with a real failure and no mock: a queue name of 230 bytes is valid,
//! but too long for the delay queues' routing key (the 22 delay bits take 44 bytes of the 255), so
//! every deferral of a message with a far ETA on that queue fails while plain publishes work.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use task_core::broker::{DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER, dead_letter_queue};
use task_core::diag::{self, AddArgs};
use task_core::{Broker, Client, MemoryBackend, TaskState, Worker};

/// The worker's own bound (`MAX_REQUEUES` in the worker): ten requeues, then the dead-letter queue.
const REQUEUES: usize = 10;

/// The wait before requeue `n` (1-based): 100 ms × 2^n, at most 12.8 s.
fn backoff(n: usize) -> Duration {
    Duration::from_millis(100 << n.min(7))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_that_keeps_failing_backs_off_then_dead_letters() {
    let mut queue = common::unique_queue("requeue");
    queue.push('.');
    while queue.len() < 230 {
        queue.push('x');
    }
    let broker = common::amqp().await;
    let backend = MemoryBackend::new();
    let worker = Worker::new(
        common::config(&queue),
        common::diag_registry(),
        broker.clone(),
        backend.clone(),
    );
    let stats = worker.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let client = Client::new(broker.clone(), backend).with_default_queue(&queue);

    // Sent as Python's Celery sends a countdown: straight to the queue with an `eta` header. The
    // worker hands an ETA an hour away to the delay queues, which this queue cannot use.
    let call = client
        .task::<diag::Add>(AddArgs::new(1, 2))
        .countdown(Duration::from_secs(3600));
    let message = call.message().unwrap();
    let result = client.result::<serde_json::Value>(message.headers.id.clone());
    let sent = Instant::now();
    broker
        .publish(&queue, &message.encode().unwrap())
        .await
        .unwrap();

    // Every delivery is counted as it arrives; record when.
    let mut deliveries: Vec<Duration> = Vec::new();
    let expected: Duration = (1..=REQUEUES).map(backoff).sum();
    let deadline = Instant::now() + expected * 2 + Duration::from_secs(30);
    while stats.dead_lettered.load(Ordering::SeqCst) == 0 {
        let received = stats.received.load(Ordering::SeqCst) as usize;
        while deliveries.len() < received {
            deliveries.push(sent.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "not dead-lettered after {:?}: deliveries at {deliveries:?}, {:?}",
            sent.elapsed(),
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = stats.received.load(Ordering::SeqCst) as usize;
    while deliveries.len() < received {
        deliveries.push(sent.elapsed());
    }

    assert_eq!(
        deliveries.len(),
        REQUEUES + 1,
        "one delivery, {REQUEUES} requeues, then the dead-letter queue: {deliveries:?}"
    );
    let gaps: Vec<Duration> = deliveries.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        // Deliveries are sampled every 20 ms, so a gap can look up to 20 ms short.
        assert!(
            *gap + Duration::from_millis(40) >= backoff(i + 1),
            "requeue {} came after {gap:?}, before its back-off of {:?}; gaps {gaps:?}",
            i + 1,
            backoff(i + 1)
        );
    }
    let first_10s = deliveries
        .iter()
        .filter(|t| **t < deliveries[0] + Duration::from_secs(10))
        .count();
    assert!(
        first_10s <= 7,
        "at most 7 tries in the first 10 s: {deliveries:?}"
    );

    let dlq = dead_letter_queue(&queue);
    let mut dead = broker
        .consume(std::slice::from_ref(&dlq), 10)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .expect("the dead-lettered copy")
        .unwrap();
    assert_eq!(
        d.message.headers[DEAD_LETTER_REASON_HEADER],
        json!(format!("the deferral failed {} times", REQUEUES + 1))
    );
    assert_eq!(d.message.headers[DEAD_LETTER_QUEUE_HEADER], json!(queue));
    let at = d.message.headers["x-dead-lettered-at"]
        .as_str()
        .expect("x-dead-lettered-at is a timestamp");
    let at = chrono::DateTime::parse_from_rfc3339(at).expect("an ISO-8601 timestamp");
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
        "dead-lettered just now: {at}"
    );
    assert_eq!(d.message.task_id(), Some(result.id()));
    d.ack().await.unwrap();
    dead.cancel().await;

    let meta = result.meta().await.unwrap().expect("FAILURE recorded");
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(
        meta.result["exc_type"],
        json!("Reject"),
        "{:?}",
        meta.result
    );
    assert_eq!(
        broker.queue_length(&queue).await.unwrap(),
        0,
        "not left cycling"
    );

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&dlq).await.unwrap();
    println!(
        "{} deliveries in {:?}; gaps {gaps:?}",
        deliveries.len(),
        deliveries.last().unwrap()
    );
}
