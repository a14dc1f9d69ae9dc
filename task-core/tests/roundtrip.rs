//! Rust client → Rust worker over the real RabbitMQ and Redis, for every diagnostic task, in JSON
//! and in msgpack.

mod common;

use std::time::Duration;

use serde_json::json;
use task_core::diag::{self, AddArgs, EchoArgs, FailArgs, SleepArgs};
use task_core::{Broker, Client, ContentType, Error, TaskState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_diagnostic_task_round_trips_in_json_and_msgpack() {
    let queue = common::unique_queue("roundtrip");
    let broker = common::amqp().await;
    let backend = common::redis().await;
    let worker = common::RunningWorker::start(
        common::config(&queue),
        common::diag_registry(),
        broker.clone(),
        backend.clone(),
    );

    for serializer in [ContentType::Json, ContentType::Msgpack] {
        let client = Client::new(broker.clone(), backend.clone())
            .with_default_queue(&queue)
            .with_serializer(serializer);
        let t = Duration::from_secs(20);

        let sum = client
            .task::<diag::Add>(AddArgs::new(2, 3))
            .send()
            .await
            .unwrap();
        assert_eq!(sum.get(t).await.unwrap(), 5.into(), "{serializer:?}");

        let float = client
            .task::<diag::Add>(AddArgs {
                x: serde_json::Number::from_f64(0.5).unwrap(),
                y: 2.into(),
            })
            .send()
            .await
            .unwrap();
        assert_eq!(float.get(t).await.unwrap().as_f64(), Some(2.5));

        let value = json!({"nested": [1, "two", null, {"ok": true}], "text": "привет"});
        let echo = client
            .task::<diag::Echo>(EchoArgs {
                value: value.clone(),
            })
            .send()
            .await
            .unwrap();
        assert_eq!(echo.get(t).await.unwrap(), value);

        let slept = client
            .task::<diag::Sleep>(SleepArgs { ms: 10 })
            .send()
            .await
            .unwrap();
        assert_eq!(slept.get(t).await.unwrap(), 10);

        let failed = client
            .task::<diag::Fail>(FailArgs {
                message: "broken on purpose".into(),
            })
            .send()
            .await
            .unwrap();
        match failed.get(t).await {
            Err(Error::TaskFailed {
                state, exception, ..
            }) => {
                assert_eq!(state, TaskState::Failure);
                assert_eq!(exception.exc_type, "ValueError");
                assert_eq!(exception.message(), "broken on purpose");
            }
            other => panic!("diag.fail should fail, got {other:?}"),
        }
        let meta = failed.meta().await.unwrap().unwrap();
        assert_eq!(meta.name.as_deref(), Some("diag.fail"));
        assert_eq!(meta.queue.as_deref(), Some(queue.as_str()));
    }

    let stats = worker.stop().await;
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    broker.delete_queue(&queue).await.unwrap();
}
