//! Delivery that holds when things go wrong: a result backend that is down for a minute, a
//! duplicate that arrives without the redelivered flag, a message that keeps killing its worker.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use task_core::coord::Coordinator;
use task_core::{
    Broker, Client, MemoryBackend, MemoryBroker, RedisBackend, Registry, ResultBackend, Task,
    TaskContext, TaskError, TaskState, Worker, WorkerConfig,
};
use tokio::process::{Child, Command};

/// Counts its runs per argument: the side effect a duplicate run would repeat.
#[derive(Clone, Default)]
struct Effect {
    runs: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Task for Effect {
    const NAME: &'static str = "test.effect";
    type Args = (u64,);
    type Output = u64;

    async fn run(&self, _ctx: TaskContext, (n,): (u64,)) -> Result<u64, TaskError> {
        *self.runs.lock().unwrap().entry(n).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(n)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private redis-server that keeps its data across a restart (append-only file in `dir`).
fn redis_server(port: u16, dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server (Debian's redis-server package)")
}

async fn redis_answers(url: &str) -> Option<()> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
    (pong == "PONG").then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_backend_down_for_a_minute_runs_nothing_twice_and_loses_no_result() {
    let dir = std::env::temp_dir().join(format!("redis-outage-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut redis = redis_server(port, &dir);
    common::eventually(
        "the private redis to answer",
        Duration::from_secs(10),
        || redis_answers(&url),
    )
    .await;

    let queue = common::unique_queue("redis-outage");
    let broker = common::amqp().await;
    let backend = RedisBackend::connect(&url).await.unwrap();
    let effect = Effect::default();
    let mut registry = Registry::new();
    registry.register(effect.clone());
    let worker = common::RunningWorker::start(
        common::config(&queue),
        registry,
        broker.clone(),
        backend.clone(),
    );
    let client = Client::new(broker.clone(), backend.clone()).with_default_queue(&queue);
    const N: u64 = 200;
    let mut ids = Vec::new();
    for n in 0..N {
        let r = client.task::<Effect>((n,)).send().await.unwrap();
        ids.push(r.id().to_owned());
    }
    common::eventually(
        "some results before the outage",
        Duration::from_secs(30),
        || async { (effect.runs.lock().unwrap().len() >= 40).then_some(()) },
    )
    .await;

    // The outage: Redis is gone for 60 s (twice what a store used to wait before giving the
    // message back to run again). Throughout it, no task starts a second time.
    redis.kill().await.unwrap();
    let _ = redis.wait().await;
    let outage_ends = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < outage_ends {
        let again: Vec<u64> = (effect.runs.lock().unwrap().iter())
            .filter(|(_, r)| **r > 1)
            .map(|(n, _)| *n)
            .collect();
        assert!(
            again.is_empty(),
            "run again while Redis was down: {again:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _redis = redis_server(port, &dir);
    common::eventually("redis to be back", Duration::from_secs(10), || {
        redis_answers(&url)
    })
    .await;

    for (n, id) in ids.iter().enumerate() {
        let meta = common::eventually(
            &format!("the result of task {n}"),
            Duration::from_secs(60),
            || async {
                backend
                    .get(id)
                    .await
                    .ok()
                    .flatten()
                    .filter(|m| m.status == TaskState::Success)
            },
        )
        .await;
        assert_eq!(meta.result, json!(n));
    }
    let runs = effect.runs.lock().unwrap().clone();
    assert_eq!(runs.len() as u64, N, "every task ran");
    let twice: Vec<_> = runs.iter().filter(|(_, r)| **r != 1).collect();
    assert!(twice.is_empty(), "tasks run more than once: {twice:?}");
    worker.stop().await;
    broker.delete_queue(&queue).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A publish retried after a lost confirm: the same message twice, neither redelivered. The
/// second is recognised by its start count and stored result and acknowledged without a run.
async fn a_duplicate_is_not_run_again<B, R>(
    broker: B,
    backend: R,
    coordinator: Coordinator,
    queue: &str,
) where
    B: Broker + Clone + Into<task_core::AnyBroker>,
    R: ResultBackend + Clone + Into<task_core::AnyBackend>,
{
    let effect = Effect::default();
    let mut registry = Registry::new();
    registry.register(effect.clone());
    let worker = Worker::new(
        common::config(queue),
        registry,
        broker.clone(),
        backend.clone(),
    )
    .with_coordinator(coordinator);
    let stats = worker.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let client = Client::new(broker.clone(), backend.clone()).with_default_queue(queue);
    let message = client.task::<Effect>((7,)).message().unwrap();
    client.publish(queue, &message).await.unwrap();
    client
        .result::<u64>(message.headers.id.clone())
        .get(Duration::from_secs(10))
        .await
        .unwrap();
    client.publish(queue, &message).await.unwrap();
    common::eventually(
        "the duplicate to be handled",
        Duration::from_secs(10),
        || async { (stats.duplicates.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    assert_eq!(effect.runs.lock().unwrap()[&7], 1);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_without_the_redelivered_flag_is_not_run_again() {
    let (broker, backend) = (MemoryBroker::new(), MemoryBackend::new());
    a_duplicate_is_not_run_again(broker, backend, Coordinator::memory(), "dups").await;
}

/// The same on RabbitMQ and Redis with the worker binary's set-up (the coordinator shares the
/// backend's connection), where the start is counted and the stored result read in one script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_without_the_redelivered_flag_is_not_run_again_on_redis() {
    let queue = common::unique_queue("dups");
    let broker = common::amqp().await;
    let backend = common::redis().await;
    let coordinator = Coordinator::from_backend(&backend)
        .with_prefix(format!("test-{}:", uuid::Uuid::new_v4().simple()));
    a_duplicate_is_not_run_again(broker.clone(), backend, coordinator, &queue).await;
    broker.delete_queue(&queue).await.unwrap();
}

/// Never finishes: stands for a message that wedges or kills whoever runs it.
#[derive(Clone, Default)]
struct Wedge {
    starts: Arc<std::sync::atomic::AtomicU32>,
}

impl Task for Wedge {
    const NAME: &'static str = "test.wedge";
    type Args = ();
    type Output = ();

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<(), TaskError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_five_restarts() {
    let (broker, backend) = (MemoryBroker::new(), MemoryBackend::new());
    let coordinator = Coordinator::memory();
    let wedge = Wedge::default();
    let queue = "poison";
    let client = Client::new(broker.clone(), backend.clone()).with_default_queue(queue);
    let sent = client.task::<Wedge>(()).send().await.unwrap();
    // Each worker starts it and is then stopped with no time to finish: the message comes back.
    for round in 1..=7u32 {
        let mut registry = Registry::new();
        registry.register(wedge.clone());
        let config = WorkerConfig {
            shutdown_timeout: Duration::from_millis(10),
            ..common::config(queue)
        };
        let worker = Worker::new(config, registry, broker.clone(), backend.clone())
            .with_coordinator(coordinator.clone());
        let stats = worker.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        let settled = common::eventually(
            &format!("round {round} to start the task or dead-letter it"),
            Duration::from_secs(10),
            || async {
                if stats.dead_lettered.load(Ordering::Relaxed) == 1 {
                    return Some(true);
                }
                (wedge.starts.load(Ordering::SeqCst) >= round).then_some(false)
            },
        )
        .await;
        let _ = stop.send(());
        running.await.unwrap().unwrap();
        if settled {
            // First delivery plus five redelivered starts; the seventh delivery is refused.
            assert_eq!(round, 7, "dead-lettered in round {round}");
            assert_eq!(wedge.starts.load(Ordering::SeqCst), 6);
            let meta = backend.get(sent.id()).await.unwrap().unwrap();
            assert_eq!(meta.status, TaskState::Failure);
            assert_eq!(meta.exception_info().unwrap().exc_type, "WorkerLostError");
            assert_eq!(
                broker
                    .queue_length(&task_core::broker::dead_letter_queue(queue))
                    .await
                    .unwrap(),
                1
            );
            return;
        }
    }
    panic!("the poison message was never dead-lettered");
}

/// Runs for a while, counting its starts.
#[derive(Clone, Default)]
struct Slow {
    starts: Arc<std::sync::atomic::AtomicU32>,
}

impl Task for Slow {
    const NAME: &'static str = "test.slow";
    type Args = (u64,);
    type Output = u64;

    async fn run(&self, _ctx: TaskContext, (ms,): (u64,)) -> Result<u64, TaskError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
}

/// Closes this process's connections to RabbitMQ, as the broker does when a delivery outlives
/// `consumer_timeout`: everything unacknowledged goes back to the queue.
fn close_my_connections() -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    // Our connections name themselves `task-core <pid>@<host>` in their client properties.
    let mine = format!("\"connection_name\",\"task-core {}@", std::process::id());
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&mine))
        .filter_map(|l| l.split('\t').next().map(str::to_owned))
        .collect();
    for pid in &pids {
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test: consumer_timeout"])
            .status()
            .expect("rabbitmqctl")
            .success();
        assert!(ok, "close_connection {pid}");
    }
    pids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_redelivered_while_the_original_runs_is_not_started_again() {
    let queue = common::unique_queue("consumer-timeout");
    let broker = common::amqp().await;
    let backend = common::redis().await;
    let slow = Slow::default();
    let mut registry = Registry::new();
    registry.register(slow.clone());
    let worker = Worker::new(
        common::config(&queue),
        registry,
        broker.clone(),
        backend.clone(),
    );
    let stats = worker.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let client = Client::new(broker.clone(), backend.clone()).with_default_queue(&queue);
    let sent = client.task::<Slow>((3_000,)).send().await.unwrap();
    common::eventually("the task to start", Duration::from_secs(20), || async {
        (slow.starts.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(
        close_my_connections() >= 1,
        "no connection of this process found"
    );
    assert_eq!(sent.get(Duration::from_secs(30)).await.unwrap(), 3_000);
    common::eventually(
        "the copy to be settled",
        Duration::from_secs(30),
        || async { (stats.duplicates.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    assert_eq!(slow.starts.load(Ordering::SeqCst), 1, "started twice");
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let broker = common::amqp().await;
    assert_eq!(broker.queue_length(&queue).await.unwrap(), 0);
    broker.delete_queue(&queue).await.unwrap();
}
