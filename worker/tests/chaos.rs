//! The worker binary under SIGKILL and SIGTERM, against the real RabbitMQ and Redis.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use task_core::diag::{self, SleepArgs};
use task_core::{Broker, Client, ResultBackend, TaskState};

async fn client(queue: &str) -> Client {
    Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing() {
    let queue = common::unique_queue("sigkill");
    let redis = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = redis.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("celery-task-meta-*").await.unwrap();
    let successes = common::count_successes(pubsub);

    let client = client(&queue).await;
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(
            client
                .task::<diag::Sleep>(SleepArgs { ms: 20 })
                .send()
                .await
                .unwrap()
                .id()
                .to_owned(),
        );
    }
    // Every run is counted from the workers' own logs: a task run twice stores one SUCCESS (the
    // second store changes nothing and announces nothing), so results alone cannot show it.
    const LOG: (&str, &str) = ("RUST_LOG", "info,task_core::worker=debug");
    let first = common::WorkerProcess::spawn(
        &queue,
        &[("WORKER_CONCURRENCY", "8"), ("WORKER_PREFETCH", "32"), LOG],
    );
    let done = |n: usize| {
        let successes = successes.clone();
        let ids = ids.clone();
        async move {
            (ids.iter()
                .filter(|id| successes.borrow().contains_key(*id))
                .count()
                >= n)
                .then_some(())
        }
    };
    common::eventually("a third of the batch done", Duration::from_secs(60), || {
        done(100)
    })
    .await;
    first.signal("KILL");
    let mut first = first;
    let _ = first.child.wait().await;
    // What was finished when the first worker died: the second must never start it again.
    let mut finished = HashSet::new();
    for id in &ids {
        if let Some(meta) = client.backend().get(id).await.unwrap()
            && meta.status.is_ready()
        {
            finished.insert(id.clone());
        }
    }
    let before = common::starts(&first.log_text());
    drop(first);

    let second = common::WorkerProcess::spawn(&queue, &[("WORKER_CONCURRENCY", "8"), LOG]);
    common::eventually("the whole batch done", Duration::from_secs(120), || {
        done(300)
    })
    .await;
    let after = common::starts(&second.log_text());
    drop(second);
    let counts = successes.borrow().clone();
    let mut rerun = 0;
    for id in &ids {
        let (s1, s2) = (
            before.get(id).copied().unwrap_or(0),
            after.get(id).copied().unwrap_or(0),
        );
        assert!(
            s1 + s2 >= 1 && s1 <= 1 && s2 <= 1,
            "task {id} started {s1} + {s2} times"
        );
        if finished.contains(id) {
            assert_eq!(
                s2, 0,
                "task {id} had finished before the kill and ran again"
            );
        } else if s1 == 1 && s2 == 1 {
            rerun += 1; // running (or done, its result not yet stored) when the worker died
        }
        assert_eq!(counts.get(id), Some(&1), "task {id}: one SUCCESS announced");
        let meta = client.backend().get(id).await.unwrap().unwrap();
        assert_eq!(meta.status, TaskState::Success);
    }
    println!(
        "{} finished before the kill, never started again; {rerun} interrupted by it and run \
         again; every other task ran once",
        finished.len()
    );
    client.broker().delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_tasks_and_returns_the_rest() {
    let queue = common::unique_queue("sigterm");
    let client = client(&queue).await;
    let worker = common::WorkerProcess::spawn(
        &queue,
        &[
            ("WORKER_CONCURRENCY", "3"),
            ("WORKER_PREFETCH", "10"),
            ("RUST_LOG", "info,task_core::worker=debug"),
        ],
    );
    worker.ready().await;
    let mut results = Vec::new();
    for _ in 0..10 {
        results.push(
            client
                .task::<diag::Sleep>(SleepArgs { ms: 1500 })
                .send()
                .await
                .unwrap(),
        );
    }
    common::eventually("three tasks running", Duration::from_secs(20), || async {
        (worker.log_text().matches("\"message\":\"started\"").count() >= 3).then_some(())
    })
    .await;
    worker.signal("TERM");
    let mut worker = worker;
    let status = tokio::time::timeout(Duration::from_secs(20), worker.child.wait())
        .await
        .expect("exits after draining")
        .unwrap();
    assert!(
        status.success(),
        "graceful exit, got {status}; log:\n{}",
        worker.log_text()
    );

    let mut states = Vec::new();
    for r in &results {
        states.push(r.state().await.unwrap());
    }
    assert_eq!(
        states.iter().filter(|s| **s == TaskState::Success).count(),
        3,
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == TaskState::Pending).count(),
        7,
        "{states:?}"
    );
    common::eventually(
        "unstarted tasks back in the queue",
        Duration::from_secs(10),
        || async { (client.broker().queue_length(&queue).await.unwrap() == 7).then_some(()) },
    )
    .await;

    // Another worker picks up where it left off.
    let next = common::WorkerProcess::spawn(&queue, &[("WORKER_CONCURRENCY", "8")]);
    for r in &results {
        assert_eq!(r.get(Duration::from_secs(30)).await.unwrap(), 1500);
    }
    drop(next);
    client.broker().delete_queue(&queue).await.unwrap();
}
