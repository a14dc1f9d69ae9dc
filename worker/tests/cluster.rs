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

/// The cluster's queues that hold messages, as `name ready/unacked/dead-lettering` (the last:
/// messages a quorum queue has dead-lettered at least once and not yet seen confirmed), or
/// `none`; from the first node whose management API answers.
async fn busy_queues() -> Result<String, String> {
    let mut last = String::new();
    for port in [15702, 15703, 15701] {
        let path = "queues/%2F?columns=name,messages,messages_ready,messages_unacknowledged";
        let queues = match common::management_get(port, path).await {
            Ok(v) => v,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let count = |q: &serde_json::Value, k: &str| q[k].as_u64().unwrap_or(0);
        let busy: Vec<String> = queues
            .as_array()
            .into_iter()
            .flatten()
            .filter(|q| count(q, "messages") > 0)
            .map(|q| {
                let (all, ready, unacked) = (
                    count(q, "messages"),
                    count(q, "messages_ready"),
                    count(q, "messages_unacknowledged"),
                );
                format!(
                    "{} {ready}/{unacked}/{}",
                    q["name"].as_str().unwrap_or("?"),
                    all.saturating_sub(ready + unacked)
                )
            })
            .collect();
        return Ok(if busy.is_empty() {
            "none".to_owned()
        } else {
            busy.join(", ")
        });
    }
    Err(last)
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

    // Delayed tasks first: 32 to 37 s, so they wait in delay level 5's quorum queue (32 s)
    // through the kill and the restart, and move down the levels once the cluster is whole.
    // (Shorter countdowns would be dead-lettered between levels while node 1's queues elect new
    // leaders; RabbitMQ 3.10 can strand such a message until the source level's leader moves:
    // the README's cluster section shows how it is seen and released.)
    let mut ids = Vec::with_capacity(TASKS + DELAYED);
    for i in 0..DELAYED {
        let r = client
            .send_task("diag.add", vec![json!(i), json!(0)], Default::default())
            .countdown(Duration::from_secs(32 + (i % 6) as u64))
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
    let deadline = Instant::now() + Duration::from_secs(300);
    let all_done = loop {
        let missing = {
            let seen = successes.borrow();
            ids.iter().filter(|id| !seen.contains_key(*id)).count()
        };
        if missing == 0 {
            break sending.elapsed();
        }
        if Instant::now() > deadline {
            panic!(
                "after 300 s, {missing} of {} tasks have no result; the cluster's queues \
                 holding messages (ready/unacked/dead-lettering): {}",
                TASKS + DELAYED,
                busy_queues().await.unwrap_or_else(|e| e)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every delivery's result is announced before its ack: once the task queue has nothing
    // ready or unacknowledged and the delay levels are empty, a duplicate would have shown. The
    // broker's statistics lag by up to 5 s (`collect_statistics_interval`), so "empty" counts
    // once it has held across two readings more than that apart.
    let drained_by = Instant::now() + Duration::from_secs(60);
    let mut empty_since: Option<Instant> = None;
    loop {
        let busy = busy_queues().await.unwrap_or_else(|e| e);
        if busy == "none" {
            let first = *empty_since.get_or_insert_with(Instant::now);
            if first.elapsed() > Duration::from_secs(6) {
                break;
            }
        } else {
            empty_since = None;
            assert!(
                Instant::now() < drained_by,
                "every task has a result, and after 60 s more these still hold messages: {busy}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
