//! RabbitMQ stopped and restarted (`rabbitmqctl stop_app` / `start_app`) in the middle of a run.
//!
//! This stops the broker for everything on the machine, so `scripts/test` runs it on its own after
//! the rest of the suite (every test whose name starts with `chaos_broker`).

mod common;

use std::time::Duration;

use task_core::diag::{self, AddArgs};
use task_core::{Broker, Client};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_restart_loses_nothing() {
    let queue = common::unique_queue("restart");
    let worker = common::WorkerProcess::spawn(&queue, &[("WORKER_CONCURRENCY", "8")]);
    worker.ready().await;
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);

    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..300i64 {
                let r = client
                    .task::<diag::Add>(AddArgs::new(i, 1))
                    .send()
                    .await
                    .expect("publish survives the restart");
                sent_tx.send((i, r)).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut results = Vec::new();
    while results.len() < 60 {
        results.push(sent_rx.recv().await.unwrap());
    }
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    common::eventually(
        "the worker to notice the broker is gone",
        Duration::from_secs(30),
        || async {
            let log = worker.log_text();
            (log.contains("consumer lost its channel") || log.contains("consumer stream ended"))
                .then_some(())
        },
    )
    .await;
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();

    producer.await.unwrap();
    while let Some(r) = sent_rx.recv().await {
        results.push(r);
    }
    assert_eq!(results.len(), 300);
    for (i, r) in &results {
        assert_eq!(
            r.get(Duration::from_secs(120)).await.unwrap(),
            (i + 1).into(),
            "task {i}"
        );
    }
    assert!(
        worker.log_text().contains("reconnected to RabbitMQ"),
        "the worker reconnected"
    );
    drop(worker);
    client.broker().delete_queue(&queue).await.unwrap();
}
