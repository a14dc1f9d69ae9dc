//! A three-node RabbitMQ cluster (`scripts/rabbitmq-cluster`) with quorum queues: a node is
//! SIGKILLed in the middle of a run and started again later.
//!
//! Runs in `scripts/test`'s alone phase (`chaos_broker` prefix): three more brokers and two
//! workers on two cores would slow every other test down.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use task_core::broker::QueueOptions;
use task_core::{AmqpBroker, AnyBackend, Broker, Client};

const TASKS: usize = 10_000;
const DELAYED: usize = 200;

fn cluster(args: &[&str]) -> String {
    let script = common::workspace_root().join("scripts/rabbitmq-cluster");
    let out = std::process::Command::new(&script)
        .args(args)
        .output()
        .expect("run scripts/rabbitmq-cluster");
    assert!(
        out.status.success(),
        "scripts/rabbitmq-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_a_cluster_node_killed_mid_run_loses_and_duplicates_nothing() {
    let started = Instant::now();
    tokio::task::spawn_blocking(|| cluster(&["start"]))
        .await
        .unwrap();
    let urls: Vec<String> = cluster(&["urls"]).lines().map(str::to_owned).collect();
    assert_eq!(urls.len(), 3);
    let list = urls.join(";");
    println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());

    let queue = common::unique_queue("cluster");
    let redis = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = redis.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("celery-task-meta-*").await.unwrap();
    let successes = common::count_successes(pubsub);

    let env = [
        ("BROKER_URL", list.as_str()),
        ("BROKER_QUEUE_TYPE", "quorum"),
        ("WORKER_CONCURRENCY", "8"),
    ];
    let workers = [1, 2].map(|n| {
        let name = format!("cluster{n}-{}@%h", &queue[queue.len() - 8..]);
        let mut env = env.to_vec();
        env.push(("WORKER_HOSTNAME", name.as_str()));
        common::WorkerProcess::spawn(&queue, &env)
    });
    for w in &workers {
        w.ready().await;
    }
    let broker = AmqpBroker::connect(&list)
        .await
        .unwrap()
        .with_queue_options(QueueOptions::quorum());
    let backend = AnyBackend::connect(&common::redis_url()).await.unwrap();
    let client = Client::new(broker.clone(), backend).with_default_queue(&queue);

    // Delayed tasks first: they wait in the delay levels' quorum queues through the kill.
    let mut ids = Vec::with_capacity(TASKS + DELAYED);
    for i in 0..DELAYED {
        let r = client
            .send_task("diag.add", vec![json!(i), json!(0)], Default::default())
            .countdown(Duration::from_secs(3 + (i % 6) as u64))
            .send()
            .await
            .unwrap();
        ids.push(r.id().to_owned());
    }
    let sending = Instant::now();
    let kill_at = TASKS * 3 / 10;
    let mut killed = None;
    let mut sent = futures_util::stream::iter(0..TASKS)
        .map(|i| {
            let client = &client;
            async move {
                client
                    .send_task("diag.add", vec![json!(i), json!(1)], Default::default())
                    .send()
                    .await
                    .map(|r| r.id().to_owned())
            }
        })
        .buffered(32)
        .enumerate();
    while let Some((n, id)) = sent.next().await {
        ids.push(id.unwrap_or_else(|e| panic!("publish {n} failed through the kill: {e}")));
        if n == kill_at {
            tokio::task::spawn_blocking(|| cluster(&["kill", "1"]))
                .await
                .unwrap();
            killed = Some(Instant::now());
            println!(
                "node 1 killed after {n} publishes ({:.1} s)",
                sending.elapsed().as_secs_f64()
            );
        }
    }
    drop(sent);
    let killed = killed.expect("the kill happened");
    println!(
        "{TASKS} published in {:.1} s, {:.1} s of it after the kill",
        sending.elapsed().as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    // Remote control while node 1 is still down: each worker's mailbox lived on node 1; both
    // declared it again on the node they moved to and answer a ping.
    let pongs = common::eventually(
        "both workers answering a ping with node 1 down",
        Duration::from_secs(60),
        || async {
            let replies = task_core::control::broadcast(
                &broker,
                "ping",
                json!({}),
                None,
                Duration::from_secs(2),
                None,
            )
            .await
            .ok()?;
            let suffix = format!("-{}@", &queue[queue.len() - 8..]);
            let mine: Vec<String> = replies
                .into_iter()
                .map(|(node, _)| node)
                .filter(|node| node.contains(&suffix))
                .collect();
            (mine.len() == 2).then_some(mine)
        },
    )
    .await;
    println!("with node 1 down, ping answered by {pongs:?}");
    tokio::task::spawn_blocking(|| cluster(&["restart", "1"]))
        .await
        .unwrap();
    println!(
        "node 1 back {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );

    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), TASKS + DELAYED);
    let all_done = common::eventually("every task's result", Duration::from_secs(300), || async {
        let seen = successes.borrow();
        ids.iter()
            .all(|id| seen.contains_key(id))
            .then(|| sending.elapsed())
    })
    .await;
    // Late duplicates would be announced after the last first completion: give them a moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = successes.borrow().clone();
    let twice: Vec<(&String, u32)> = ids
        .iter()
        .filter_map(|id| seen.get(id).filter(|n| **n > 1).map(|n| (id, *n)))
        .collect();
    let reconnects: Vec<String> = workers
        .iter()
        .map(|w| {
            let log = w.log_text();
            format!(
                "{} lost / {} elsewhere",
                log.matches("RabbitMQ connection lost").count(),
                log.matches("connected to another node").count()
            )
        })
        .collect();
    println!(
        "{} tasks done {:.1} s after the first publish; completed twice: {}; publisher \
         reconnects {}; workers' connections: {reconnects:?}",
        TASKS + DELAYED,
        all_done.as_secs_f64(),
        twice.len(),
        broker.reconnects()
    );
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    assert!(
        broker.reconnects() >= 1,
        "the publisher moved to another node"
    );

    drop(workers);
    broker.delete_queue(&queue).await.unwrap();
}
