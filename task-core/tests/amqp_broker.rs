//! The RabbitMQ broker against the real server, and the in-memory broker, held to the same
//! semantics by one suite of checks.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use task_core::broker::{DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER, dead_letter_queue};
use task_core::protocol::{Properties, RawMessage};
use task_core::{AnyBroker, Broker, MemoryBroker};

fn message(n: u32) -> RawMessage {
    let mut headers = serde_json::Map::new();
    headers.insert("n".into(), json!(n));
    headers.insert("nothing".into(), json!(null));
    headers.insert("limits".into(), json!([1.5, 2]));
    RawMessage {
        headers,
        properties: Properties {
            content_type: Some("application/json".into()),
            correlation_id: Some(format!("id-{n}")),
            priority: Some(0),
            delivery_mode: Some(2),
            ..Default::default()
        },
        body: format!("[[{n}], {{}}, {{}}]").into_bytes(),
    }
}

async fn next(consumer: &mut task_core::broker::Consumer) -> task_core::broker::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer open")
}

/// Publish, consume, ack; reject with requeue; drop unacknowledged; prefetch window; dead letter.
async fn broker_semantics(broker: AnyBroker) {
    let queue = common::unique_queue("semantics");
    for n in 0..3 {
        broker.publish(&queue, &message(n)).await.unwrap();
    }
    common::eventually("3 messages queued", Duration::from_secs(5), || async {
        (broker.queue_length(&queue).await.unwrap() == 3).then_some(())
    })
    .await;

    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 2)
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(
        first.message,
        message(0),
        "headers, properties and body survive the trip"
    );
    assert!(!first.redelivered);
    let second = next(&mut consumer).await;
    // The prefetch window is 2: a third delivery waits until one is settled.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err()
    );
    first.ack().await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!(
        third.message.properties.correlation_id.as_deref(),
        Some("id-2")
    );

    second.reject(true).await.unwrap();
    let again = next(&mut consumer).await;
    assert_eq!(
        again.message.properties.correlation_id.as_deref(),
        Some("id-1")
    );
    assert!(
        again.redelivered,
        "a requeued message is flagged redelivered"
    );
    again.ack().await.unwrap();

    third.reject(false).await.unwrap();
    broker
        .dead_letter(&queue, &message(9), "bad input: testing")
        .await
        .unwrap();
    consumer.cancel().await;

    let dlq = dead_letter_queue(&queue);
    let mut dead = broker
        .consume(std::slice::from_ref(&dlq), 10)
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert_eq!(
        d.message.headers[DEAD_LETTER_REASON_HEADER],
        json!("bad input: testing")
    );
    assert_eq!(d.message.headers[DEAD_LETTER_QUEUE_HEADER], json!(queue));
    assert_eq!(d.message.body, message(9).body);
    d.ack().await.unwrap();
    dead.cancel().await;
    assert_eq!(
        broker.queue_length(&queue).await.unwrap(),
        0,
        "rejected without requeue is gone"
    );

    // A delivery dropped without being settled comes back, flagged.
    broker.publish(&queue, &message(5)).await.unwrap();
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    drop(consumer);
    drop(d);
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.message.properties.correlation_id.as_deref(), Some("id-5"));
    d.ack().await.unwrap();
    consumer.cancel().await;

    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&dlq).await.unwrap();
}

#[tokio::test]
async fn memory_broker_semantics() {
    broker_semantics(MemoryBroker::new().into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_semantics() {
    broker_semantics(common::amqp().await.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_delays_are_kept_by_the_broker() {
    let broker: AnyBroker = common::amqp().await.into();
    let queue = common::unique_queue("delay");
    let start = Instant::now();
    broker
        .publish_delayed(&queue, &message(1), Duration::from_secs(2))
        .await
        .unwrap();
    broker
        .publish_delayed(&queue, &message(2), Duration::from_secs(1))
        .await
        .unwrap();
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 10)
        .await
        .unwrap();
    let d1 = next(&mut consumer).await;
    let t1 = start.elapsed();
    let d2 = next(&mut consumer).await;
    let t2 = start.elapsed();
    assert_eq!(
        d1.message.properties.correlation_id.as_deref(),
        Some("id-2"),
        "the shorter delay arrives first"
    );
    assert_eq!(
        d2.message.properties.correlation_id.as_deref(),
        Some("id-1")
    );
    assert!(
        t1 >= Duration::from_secs(1) && t1 < Duration::from_millis(2900),
        "1 s delay took {t1:?}"
    );
    assert!(
        t2 >= Duration::from_secs(2) && t2 < Duration::from_millis(3900),
        "2 s delay took {t2:?}"
    );
    assert_eq!(d2.message.body, message(1).body);
    d1.ack().await.unwrap();
    d2.ack().await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
}

/// Messages whose destination queue was deleted while they waited must not clog the delay
/// levels for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_delays_to_deleted_queues_do_not_block_others() {
    let broker: AnyBroker = common::amqp().await.into();
    let gone = common::unique_queue("delay-gone");
    for n in 0..40 {
        broker
            .publish_delayed(&gone, &message(n), Duration::from_secs(1))
            .await
            .unwrap();
    }
    broker.delete_queue(&gone).await.unwrap();
    let queue = common::unique_queue("delay-after");
    broker
        .publish_delayed(&queue, &message(99), Duration::from_secs(1))
        .await
        .unwrap();
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 10)
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.message.body, message(99).body);
    d.ack().await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
}
