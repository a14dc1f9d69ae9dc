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
    next_within(consumer, Duration::from_secs(10)).await
}

async fn next_within(
    consumer: &mut task_core::broker::Consumer,
    limit: Duration,
) -> task_core::broker::Delivery {
    tokio::time::timeout(limit, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {limit:?}"))
        .expect("consumer open")
}

/// How long a test waits for a delayed message. The `tq.delay.*` queues are shared by every test
/// and worker on the machine, and dead-lettering between them slows down on a loaded box, so this
/// is a bound on being stuck, not a measure of the delay: only lower bounds are asserted.
const DELAYED_WITHIN: Duration = Duration::from_secs(90);

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
    let at = d.message.headers["x-dead-lettered-at"]
        .as_str()
        .expect("x-dead-lettered-at is a timestamp");
    let at = chrono::DateTime::parse_from_rfc3339(at).expect("x-dead-lettered-at is ISO-8601");
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
        "dead-lettered just now: {at}"
    );
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
    assert!(
        d.redelivered,
        "a dropped delivery comes back flagged redelivered"
    );
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
        .publish_delayed(&queue, &message(1), Duration::from_secs(3))
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
    let d1 = next_within(&mut consumer, DELAYED_WITHIN).await;
    let t1 = start.elapsed();
    let d2 = next_within(&mut consumer, DELAYED_WITHIN).await;
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
    assert!(t1 >= Duration::from_secs(1), "1 s delay took {t1:?}");
    assert!(t2 >= Duration::from_secs(3), "3 s delay took {t2:?}");
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
    let d = next_within(&mut consumer, DELAYED_WITHIN).await;
    assert_eq!(d.message.body, message(99).body);
    d.ack().await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
}

/// RabbitMQ closes the publishing channel over a message it will not take (here an `expiration`
/// that is not a number of milliseconds: 406, the same path as a message above
/// `max_message_size`). That publish fails at once with the broker's reason; the consumers of the
/// same broker handle, receiving a steady stream meanwhile, see no reconnect and no redelivery;
/// the publishes around it, including one caught on the closed channel, go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_refused_publish_fails_fast_and_leaves_consumers_alone() {
    const STREAM: u32 = 300;
    let amqp = common::amqp().await;
    let broker: AnyBroker = amqp.clone().into();
    let queue = common::unique_queue("refused");
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 50)
        .await
        .unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let receiving = tokio::spawn(async move {
        while let Some(d) = consumer.next().await {
            let id = d.message.properties.correlation_id.clone().unwrap();
            let redelivered = d.redelivered;
            d.ack().await.unwrap();
            if seen_tx.send((id, redelivered)).is_err() {
                break;
            }
        }
        consumer
    });
    let producing = {
        let (broker, queue) = (broker.clone(), queue.clone());
        tokio::spawn(async move {
            for n in 0..STREAM {
                broker.publish(&queue, &message(n)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(seen_rx.recv().await.unwrap());
    }

    let mut bad = message(10_000);
    bad.properties.expiration = Some("soon".into());
    let start = Instant::now();
    let refused = broker.publish(&queue, &bad).await;
    let took = start.elapsed();
    match &refused {
        Err(task_core::Error::Refused { what, code, text }) => {
            assert_eq!(*code, 406, "{refused:?}");
            assert!(what.contains(&queue), "the error names the queue: {what}");
            assert!(text.contains("expiration"), "the broker's reason: {text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let shown = refused.unwrap_err().to_string();
    assert!(shown.starts_with("RabbitMQ refused the publish"), "{shown}");
    assert!(
        took < Duration::from_secs(5),
        "a refusal is not retried through reconnects (took {took:?})"
    );
    broker.publish(&queue, &message(20_000)).await.unwrap();

    producing.await.unwrap();
    common::eventually(
        "every message of the stream and the one after the refusal",
        Duration::from_secs(60),
        || {
            while let Ok(s) = seen_rx.try_recv() {
                seen.push(s);
            }
            let mut ids: Vec<_> = seen.iter().map(|(id, _)| id.clone()).collect();
            ids.sort();
            ids.dedup();
            let done = ids.len() > STREAM as usize;
            async move { done.then_some(()) }
        },
    )
    .await;
    let redelivered: Vec<_> = seen.iter().filter(|(_, r)| *r).collect();
    assert!(redelivered.is_empty(), "redeliveries: {redelivered:?}");
    let mut ids: Vec<_> = seen.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), STREAM as usize + 1, "every message arrived");
    // The stream's publish that was waiting for its confirm when the channel closed is published
    // again on a fresh channel; if the broker had already taken it, it arrives twice (at least
    // once, as after any lost confirm). Nothing else may repeat.
    assert!(
        seen.len() - ids.len() <= 1,
        "{} deliveries of {} messages",
        seen.len(),
        ids.len()
    );
    assert!(
        !ids.contains(&"id-10000".to_owned()),
        "the refused one is not queued"
    );
    assert_eq!(amqp.reconnects(), 0, "no connection was reset");
    drop(seen_rx);
    broker.publish(&queue, &message(30_000)).await.unwrap();
    let mut consumer = receiving.await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
    println!(
        "refused in {took:?}: {shown}; {} deliveries of {} messages, none redelivered",
        seen.len(),
        ids.len()
    );
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "rabbitmqctl {args:?} failed"
    );
}

/// Starts the RabbitMQ application again when dropped, so a test that fails while the broker is
/// stopped does not leave it down for everyone.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("await_startup")
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Delayed messages wait in the broker's quorum delay queues, not in any process: stopping and
/// starting RabbitMQ while they wait loses none, and none comes back before its time.
///
/// This stops the broker for everything on the machine; `scripts/test` runs it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_delayed_messages_survive_a_restart() {
    let broker: AnyBroker = common::amqp().await.into();
    let queue = common::unique_queue("delay-restart");
    let delays = [20u64, 25, 30];
    let start = Instant::now();
    for (n, secs) in delays.iter().enumerate() {
        broker
            .publish_delayed(&queue, &message(n as u32), Duration::from_secs(*secs))
            .await
            .unwrap();
    }
    assert_eq!(
        broker.queue_length(&queue).await.unwrap(),
        0,
        "still waiting in the delay queues"
    );
    {
        let restart = StartAppOnDrop;
        tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
            .await
            .unwrap();
        tokio::task::spawn_blocking(move || drop(restart))
            .await
            .unwrap();
    }
    let restarted = start.elapsed();
    assert!(
        restarted < Duration::from_secs(delays[0]),
        "the restart took {restarted:?}, longer than the shortest delay: the test shows nothing"
    );
    let mut consumer = common::eventually(
        "a consumer after the restart",
        Duration::from_secs(60),
        || async { broker.consume(std::slice::from_ref(&queue), 10).await.ok() },
    )
    .await;
    for (n, secs) in delays.iter().enumerate() {
        let d = next_within(&mut consumer, DELAYED_WITHIN).await;
        let t = start.elapsed();
        assert_eq!(
            d.message.properties.correlation_id.as_deref(),
            Some(format!("id-{n}").as_str()),
            "in order of their delays"
        );
        assert_eq!(d.message.body, message(n as u32).body);
        // RabbitMQ's expiry of the recovered levels can come a little early (0.1 s once in CI);
        // a worker holds an early task until its ETA, so only a real shortcut fails here.
        assert!(
            t + Duration::from_millis(500) >= Duration::from_secs(*secs),
            "the {secs} s delay came back after {t:?}"
        );
        d.ack().await.unwrap();
        println!("{secs} s delay delivered after {t:?} (restart done at {restarted:?})");
    }
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
}

/// Quorum queues refuse a channel-wide prefetch window; with `QosScope::PerConsumer` the broker
/// consumes them (an operator's pre-declared quorum queue is used as it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_per_consumer_qos_consumes_a_quorum_queue() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    let queue = common::unique_queue("quorum");
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap();

    let broker: AnyBroker = common::amqp()
        .await
        .with_qos(task_core::broker::QosScope::PerConsumer)
        .into();
    for n in 0..3 {
        broker.publish(&queue, &message(n)).await.unwrap();
    }
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 2)
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err(),
        "the per-consumer window is 2"
    );
    first.ack().await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!(
        third.message.properties.correlation_id.as_deref(),
        Some("id-2")
    );
    second.ack().await.unwrap();
    third.ack().await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// A queue's arguments, read back from the management API (`scripts/services` enables it).
async fn queue_arguments(queue: &str) -> serde_json::Value {
    let url = format!(
        "http://127.0.0.1:15672/api/queues/%2F/{}",
        queue.replace('/', "%2F")
    );
    let body: serde_json::Value = reqwest::Client::new()
        .get(&url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("the management API answers (scripts/services enables it)")
        .json()
        .await
        .unwrap();
    body["arguments"].clone()
}

/// `QueueOptions` declare quorum queues with a delivery limit, consumed with a per-consumer
/// window; a poison message is dropped after the limit; a queue not declared quorum here but
/// quorum on the broker (RabbitMQ closes the connection over a channel-wide window) is consumed
/// after the broker switches to per-consumer windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_quorum_queues_from_the_options_with_a_delivery_limit() {
    use task_core::broker::{QueueOptions, QueueType};

    let queue = common::unique_queue("quorum-opts");
    let options = QueueOptions::classic()
        .with_quorum_queue(&queue)
        .with_delivery_limit(2);
    assert_eq!(options.queue_type(&queue), QueueType::Quorum);
    let broker: AnyBroker = common::amqp().await.with_queue_options(options).into();
    broker.publish(&queue, &message(0)).await.unwrap();
    let args = queue_arguments(&queue).await;
    println!("declared with {args}");
    assert_eq!(args["x-queue-type"], "quorum");
    assert_eq!(args["x-delivery-limit"], 2);

    // Rejected with requeue: delivered at most 1 + limit times, then dropped.
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 4)
        .await
        .unwrap();
    let mut deliveries = 0;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
        deliveries += 1;
        d.reject(true).await.unwrap();
        assert!(deliveries <= 5, "the poison message keeps coming");
    }
    println!("poison message delivered {deliveries} times");
    assert_eq!(deliveries, 3, "first delivery plus two redeliveries");
    common::eventually(
        "the poison message dropped",
        Duration::from_secs(10),
        || async { (broker.queue_length(&queue).await.unwrap() == 0).then_some(()) },
    )
    .await;
    consumer.cancel().await;

    // An operator's quorum queue next to a classic one, consumed on one channel by a broker that
    // thinks both classic: refused a channel-wide window once, it switches and consumes.
    let other = common::unique_queue("quorum-preexisting");
    let plain: AnyBroker = common::amqp()
        .await
        .with_queue_options(QueueOptions::classic().with_quorum_queue(&other))
        .into();
    plain.publish(&other, &message(1)).await.unwrap();
    let classic = common::unique_queue("classic-beside");
    let unaware: AnyBroker = common::amqp()
        .await
        .with_queue_options(QueueOptions::classic())
        .into();
    unaware.publish(&classic, &message(2)).await.unwrap();
    let mut consumer = unaware
        .consume(&[other.clone(), classic.clone()], 4)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = next_within(&mut consumer, Duration::from_secs(30)).await;
        seen.push(d.message.properties.correlation_id.clone().unwrap());
        d.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen, ["id-1", "id-2"]);
    consumer.cancel().await;
    for q in [&queue, &other, &classic] {
        broker.delete_queue(q).await.unwrap();
    }
}

/// A list of brokers: the first one that answers takes the connection; a list with a non-AMQP
/// entry is refused with the entry named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_broker_list_connects_to_the_node_that_answers() {
    // Nothing listens on port 1 of loopback.
    let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f;{}", common::amqp_url());
    let broker = task_core::AmqpBroker::connect(&urls).await.unwrap();
    assert!(
        broker.display_url().contains(";"),
        "{}",
        broker.display_url()
    );
    let broker: AnyBroker = broker.into();
    let queue = common::unique_queue("failover-list");
    broker.publish(&queue, &message(7)).await.unwrap();
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.message.properties.correlation_id.as_deref(), Some("id-7"));
    d.ack().await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();

    let e = task_core::AmqpBroker::connect(&format!("{},redis://127.0.0.1", common::amqp_url()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("redis://127.0.0.1") && e.contains("not an amqp"),
        "{e}"
    );
    let e = task_core::AmqpBroker::connect("amqp://127.0.0.1:1/%2f,amqp://127.0.0.1:2/%2f")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("127.0.0.1:1") && e.contains("127.0.0.1:2"),
        "{e}"
    );
}

/// A delayed message delivered, then delayed again through the same levels (a deferral, a retry
/// that republishes what it received): it carries RabbitMQ's `x-death` from the first trip, which
/// RabbitMQ would take for a dead-letter cycle, and a quorum level would then hold it for good.
/// The broker strips those headers on every publish, so the second trip arrives too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_message_delayed_twice_through_the_same_levels_arrives_both_times() {
    let broker: AnyBroker = common::amqp().await.into();
    let queue = common::unique_queue("delayed-twice");
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 4)
        .await
        .unwrap();
    broker
        .publish_delayed(&queue, &message(1), Duration::from_secs(3))
        .await
        .unwrap();
    let first = next_within(&mut consumer, DELAYED_WITHIN).await;
    assert!(
        first.message.headers.contains_key("x-death"),
        "the first trip went through dead-lettering: {:?}",
        first.message.headers.keys().collect::<Vec<_>>()
    );
    let again = first.message.clone();
    broker
        .publish_delayed(&queue, &again, Duration::from_secs(3))
        .await
        .unwrap();
    first.ack().await.unwrap();
    let second = next_within(&mut consumer, DELAYED_WITHIN).await;
    assert_eq!(
        second.message.properties.correlation_id.as_deref(),
        Some("id-1")
    );
    let deaths = second.message.headers["x-death"].as_array().unwrap().len();
    println!("second trip arrived; x-death has {deaths} entries (levels 1 and 0 of this trip)");
    assert_eq!(deaths, 2, "only the second trip's levels");
    second.ack().await.unwrap();
    consumer.cancel().await;
    broker.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_goes_to_the_callers_own_queue_undeclared_and_a_gone_one_is_reported() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
    let broker = common::amqp().await;
    // A reply queue as Celery's rpc:// client declares it: transient, auto-delete.
    let conn =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let reply_queue = common::unique_queue("reply");
    channel
        .queue_declare(
            reply_queue.as_str().into(),
            QueueDeclareOptions {
                durable: false,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut reply = message(7);
    reply.properties.delivery_mode = Some(1);
    assert!(broker.publish_reply(&reply_queue, &reply).await.unwrap());
    let got = channel
        .basic_get(
            reply_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the reply is in the caller's queue");
    assert_eq!(
        got.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("id-7")
    );
    assert_eq!(*got.properties.delivery_mode(), Some(1));
    // The queue was not redeclared (a durable redeclaration would have failed with 406).
    channel
        .queue_delete(reply_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();

    // The caller is gone: reported, and the broker keeps working.
    assert!(!broker.publish_reply(&reply_queue, &reply).await.unwrap());
    let queue = common::unique_queue("after-reply");
    broker.publish(&queue, &message(8)).await.unwrap();
    assert_eq!(broker.queue_length(&queue).await.unwrap(), 1);
    broker.delete_queue(&queue).await.unwrap();
}

/// Acknowledgements are gathered into `multiple` acks (`broker::amqp_settle`): whatever order
/// they come in, and with rejections between them, each lands exactly once, and one delivery
/// held unsettled does not keep the later ones from being acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_acknowledgements_in_any_order_all_land_once() {
    let broker = common::amqp().await;
    let queue = common::unique_queue("acks");
    const N: u32 = 300;
    for n in 0..N {
        broker.publish(&queue, &message(n)).await.unwrap();
    }
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 400)
        .await
        .unwrap();
    let mut deliveries = Vec::new();
    for _ in 0..N {
        deliveries.push(next(&mut consumer).await);
    }
    // The first delivery is held; the others are settled concurrently in a scrambled order,
    // every tenth one rejected back to the queue.
    let held = deliveries.remove(0);
    let n_of = |d: &task_core::broker::Delivery| d.message.headers["n"].as_u64().unwrap();
    assert_eq!(n_of(&held), 0);
    deliveries.sort_by_key(|d| (n_of(d) * 7919) % 301);
    let settle = |d: task_core::broker::Delivery| async move {
        let n = n_of(&d);
        if n % 10 == 0 {
            d.reject(true).await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
        n
    };
    // The first half is settled while the held delivery keeps `multiple` acks from covering
    // them (they go alone once they have waited); then the held one is acknowledged, and the
    // second half can go in `multiple` acks.
    let second = deliveries.split_off(deliveries.len() / 2);
    let first = futures_util::future::join_all(deliveries.into_iter().map(settle)).await;
    held.ack().await.unwrap();
    let second = futures_util::future::join_all(second.into_iter().map(settle)).await;
    assert_eq!(first.len() + second.len(), N as usize - 1);
    drop(consumer);
    // Every ack has landed; only the 29 rejections come back (each exactly once).
    let mut again = broker
        .consume(std::slice::from_ref(&queue), 400)
        .await
        .unwrap();
    let mut back = Vec::new();
    for _ in 0..29 {
        // Kept until acknowledged: a dropped delivery would go back to the queue.
        back.push(next(&mut again).await);
    }
    let mut numbers: Vec<u64> = back.iter().map(n_of).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..30).map(|i| i * 10).collect::<Vec<_>>());
    for d in back {
        d.ack().await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), again.next())
            .await
            .is_err(),
        "nothing else comes back"
    );
    drop(again);
    broker.delete_queue(&queue).await.unwrap();
}
