//! Bad input reaches the dead-letter queue with a reason, is recorded as FAILURE when its id is
//! known, and does not stop the worker: on the in-memory broker and on the real RabbitMQ + Redis.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use task_core::broker::{DEAD_LETTER_REASON_HEADER, dead_letter_queue};
use task_core::diag::{self, AddArgs};
use task_core::protocol::{Properties, RawMessage};
use task_core::{
    AnyBackend, AnyBroker, Broker, Client, MemoryBackend, MemoryBroker, ResultBackend, TaskState,
};

fn celery_headers(task: &str, id: &str) -> serde_json::Map<String, Value> {
    json!({"lang": "py", "task": task, "id": id, "root_id": id, "parent_id": null, "group": null,
           "retries": 0, "eta": null, "expires": null, "timelimit": [null, null], "argsrepr": "()",
           "kwargsrepr": "{}", "origin": "gen1@test"})
    .as_object()
    .cloned()
    .unwrap()
}

fn raw(headers: serde_json::Map<String, Value>, content_type: &str, body: &[u8]) -> RawMessage {
    RawMessage {
        headers,
        properties: Properties {
            content_type: Some(content_type.into()),
            delivery_mode: Some(2),
            ..Default::default()
        },
        body: body.to_vec(),
    }
}

async fn bad_input_is_dead_lettered(broker: AnyBroker, backend: AnyBackend) {
    let queue = common::unique_queue("bad");
    let id = |n: u32| format!("bad-{queue}-{n}");
    let cases = [
        (
            raw(
                serde_json::Map::new(),
                "application/json",
                b"\x00\xffnot json at all",
            ),
            None,
            "undecodable message",
        ),
        (
            raw(
                celery_headers("diag.add", &id(1)),
                "application/json",
                b"{{{{",
            ),
            Some(id(1)),
            "malformed JSON",
        ),
        (
            raw(
                celery_headers("diag.add", &id(2)),
                "application/x-python-serialize",
                b"\x80\x04K\x01.",
            ),
            Some(id(2)),
            "unsupported content type",
        ),
        (
            raw(
                celery_headers("no.such.task", &id(3)),
                "application/json",
                b"[[1], {}, {}]",
            ),
            Some(id(3)),
            "unknown task `no.such.task`",
        ),
        (
            raw(
                celery_headers("diag.add", &id(4)),
                "application/json",
                b"[[1, 2, 3], {}, {}]",
            ),
            Some(id(4)),
            "invalid arguments",
        ),
        (
            raw(
                celery_headers("diag.add", &id(5)),
                "application/json",
                b"[[\"a\", {}], {}, {}]",
            ),
            Some(id(5)),
            "invalid arguments",
        ),
        (
            raw(
                celery_headers("diag.add", &id(6)),
                "application/json",
                b"[{\"x\": 1}, {}, {}]",
            ),
            Some(id(6)),
            "args must be a list",
        ),
    ];
    for (message, _, _) in &cases {
        broker.publish(&queue, message).await.unwrap();
    }
    let worker = common::RunningWorker::start(
        common::config(&queue),
        common::diag_registry(),
        broker.clone(),
        backend.clone(),
    );

    // The worker keeps consuming: a good task after the bad ones succeeds.
    let client = Client::new(broker.clone(), backend.clone()).with_default_queue(&queue);
    let ok = client
        .task::<diag::Add>(AddArgs::new(1, 2))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.get(Duration::from_secs(20)).await.unwrap(), 3.into());

    let dlq = dead_letter_queue(&queue);
    common::eventually(
        "every bad message in the dead-letter queue",
        Duration::from_secs(10),
        || async { (broker.queue_length(&dlq).await.unwrap() == cases.len() as u64).then_some(()) },
    )
    .await;
    let mut consumer = broker
        .consume(std::slice::from_ref(&dlq), 100)
        .await
        .unwrap();
    let mut reasons = Vec::new();
    for _ in 0..cases.len() {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .unwrap()
            .unwrap();
        reasons.push((
            d.message.task_id().map(str::to_owned),
            d.message.headers[DEAD_LETTER_REASON_HEADER]
                .as_str()
                .unwrap()
                .to_owned(),
        ));
        d.ack().await.unwrap();
    }
    consumer.cancel().await;
    for (_, id, expected) in &cases {
        let (_, reason) = reasons
            .iter()
            .find(|(rid, _)| rid == id)
            .unwrap_or_else(|| panic!("no dead letter for {id:?} in {reasons:?}"));
        assert!(
            reason.contains(expected),
            "reason {reason:?} should mention {expected:?}"
        );
        if let Some(id) = id {
            let meta = backend
                .get(id)
                .await
                .unwrap()
                .expect("FAILURE recorded for a known id");
            assert_eq!(meta.status, TaskState::Failure);
        }
    }
    let unknown = backend.get(&id(3)).await.unwrap().unwrap();
    assert_eq!(unknown.exception_info().unwrap().exc_type, "NotRegistered");
    let wrong_args = backend.get(&id(4)).await.unwrap().unwrap();
    assert_eq!(wrong_args.exception_info().unwrap().exc_type, "TypeError");

    let stats = worker.stop().await;
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        cases.len() as u64
    );
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&dlq).await.unwrap();
}

#[tokio::test]
async fn in_memory() {
    bad_input_is_dead_lettered(MemoryBroker::new().into(), MemoryBackend::new().into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_and_redis() {
    bad_input_is_dead_lettered(common::amqp().await.into(), common::redis().await.into()).await;
}
