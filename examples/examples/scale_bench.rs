//! Scale-out: how draining a backlog of no-op tasks grows with 1, 2 and 4 `worker` processes on
//! a RabbitMQ cluster with quorum queues, and where the ceiling is.
//!
//! ```sh
//! scripts/rabbitmq-cluster start
//! cargo build --release -p worker && cargo build --release -p examples --example scale_bench
//! target/release/examples/scale_bench --broker "$(scripts/rabbitmq-cluster urls | paste -sd';')"
//! ```
//!
//! Each round publishes `--tasks` `diag.add` to a fresh quorum queue (the backlog), then starts
//! the round's workers (each `--concurrency` slots, all connecting through the broker list) and
//! times the drain until every result is announced on Redis. Alongside it samples the CPU time
//! (`/proc/<pid>/stat`) of the broker nodes (the cluster's pid files, or the machine's own
//! broker's), of the workers, of Redis and of itself, so the printout says which side ran out of
//! cores.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::{Value, json};
use task_core::broker::QueueOptions;
use task_core::{AmqpBroker, AnyBackend, Broker, Client};

#[derive(Parser)]
#[command(about = "Drain a backlog with 1, 2, 4 worker processes on a RabbitMQ cluster")]
struct Args {
    /// The cluster's nodes, `;`-separated (scripts/rabbitmq-cluster urls).
    #[arg(long, env = "BROKER_URL")]
    broker: String,
    /// Redis for the results.
    #[arg(
        long,
        env = "RESULT_BACKEND",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    backend: String,
    /// Tasks per round.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Worker processes per round, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Slots per worker.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Classic queues instead of quorum ones (for comparison).
    #[arg(long)]
    classic: bool,
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The RabbitMQ processes behind `broker`: the nodes of `scripts/rabbitmq-cluster` when the
/// list names its ports (5701–5703), otherwise the machine's own broker (Debian's pid file).
fn broker_pids(broker: &str) -> Vec<u32> {
    let files: Vec<String> = if (5701..=5703).any(|p| broker.contains(&format!(":{p}/"))) {
        (1..=3)
            .map(|n| format!("/var/lib/rabbitmq/tq-cluster/{n}/pid"))
            .collect()
    } else {
        std::fs::read_dir("/var/lib/rabbitmq/mnesia")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path().display().to_string())
                    .filter(|p| p.ends_with(".pid"))
                    .collect()
            })
            .unwrap_or_default()
    };
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
        .collect()
}

fn pid_of(name: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-o", "-x", name])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

fn total(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
}

async fn round(
    args: &Args,
    worker: &Path,
    workers: usize,
    redis: &redis::Client,
) -> anyhow::Result<()> {
    let queue = format!("bench.scale.{}", uuid::Uuid::new_v4().simple());
    let options = if args.classic {
        QueueOptions::classic()
    } else {
        QueueOptions::quorum()
    };
    let broker = AmqpBroker::connect(&args.broker)
        .await?
        .with_queue_options(options);
    let backend = AnyBackend::connect(&args.backend).await?;
    let client = Client::new(broker.clone(), backend).with_default_queue(&queue);

    let mut pubsub = redis.get_async_pubsub().await?;
    pubsub.psubscribe("celery-task-meta-*").await?;

    let publishing = Instant::now();
    let ids: Vec<String> = futures_util::stream::iter(0..args.tasks)
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
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let published = publishing.elapsed();
    let mut waiting: HashSet<String> = ids.into_iter().collect();

    let cluster = broker_pids(&args.broker);
    let redis_pid: Vec<u32> = pid_of("redis-server").into_iter().collect();
    let queue_type = if args.classic { "classic" } else { "quorum" };
    let mut children = Vec::new();
    for n in 0..workers {
        children.push(
            tokio::process::Command::new(worker)
                .env("BROKER_URL", &args.broker)
                .env("RESULT_BACKEND", &args.backend)
                .env("BROKER_QUEUE_TYPE", queue_type)
                .env("WORKER_QUEUES", &queue)
                .env("WORKER_TASKS", "diag")
                .env("WORKER_CONCURRENCY", args.concurrency.to_string())
                .env("WORKER_HOSTNAME", format!("scale{n}@%h"))
                .env("METRICS_BIND", "off")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start a worker")?,
        );
    }
    let worker_pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let me = [std::process::id()];
    let (b0, w0, r0, m0) = (
        total(&cluster),
        total(&worker_pids),
        total(&redis_pid),
        total(&me),
    );
    let started = Instant::now();
    let mut messages = pubsub.on_message();
    let deadline = started + Duration::from_secs(600);
    while !waiting.is_empty() {
        let msg = tokio::time::timeout_at(deadline.into(), messages.next())
            .await
            .context("results stopped arriving")?
            .context("Redis pub/sub closed")?;
        let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
        if let Ok(meta) = serde_json::from_slice::<Value>(&payload)
            && meta["status"] == "SUCCESS"
            && let Some(id) = meta["task_id"].as_str()
        {
            waiting.remove(id);
        }
    }
    let drained = started.elapsed().as_secs_f64();
    let (b1, w1, r1, m1) = (
        total(&cluster),
        total(&worker_pids),
        total(&redis_pid),
        total(&me),
    );
    drop(children);
    let cores = |a: f64, b: f64| (b - a) / drained;
    println!(
        "| {workers} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        args.tasks as f64 / published.as_secs_f64(),
        args.tasks as f64 / drained,
        cores(b0, b1),
        cores(w0, w1),
        cores(r0, r1),
        cores(m0, m1),
        cores(b0 + w0 + r0 + m0, b1 + w1 + r1 + m1),
    );
    broker.delete_queue(&queue).await?;
    broker.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker: PathBuf = examples::worker_binary()?;
    if !args.broker.starts_with("amqp") {
        bail!("--broker: expected amqp:// URLs");
    }
    let redis = redis::Client::open(args.backend.as_str())?;
    println!(
        "{} tasks per round, {} slots per worker, {} queues, {} broker node(s); CPU in cores \
         (CPU seconds per second of the drain)",
        args.tasks,
        args.concurrency,
        if args.classic { "classic" } else { "quorum" },
        args.broker.split(';').count()
    );
    println!(
        "| workers | publish tasks/s | drain tasks/s | brokers' CPU | workers' CPU | Redis CPU | \
         this program's CPU | all |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &args.workers {
        round(&args, &worker, n, &redis).await?;
    }
    Ok(())
}
