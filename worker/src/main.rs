//! `worker`: runs billing and diagnostic tasks from RabbitMQ queues and stores their results in
//! Redis.
//!
//! Configuration comes from flags or the environment (ARCHITECTURE.md §3.4); `worker --help` lists
//! both. SIGTERM or SIGINT starts a graceful shutdown; a second one stops at once.

use std::time::Duration;

use billing_tasks::config::BillingArgs;
use clap::{Parser, ValueEnum};
use task_core::cli::{ConnectionArgs, parse_or_exit};
use task_core::{AnyBackend, AnyBroker, Client, Registry, Worker, WorkerConfig};

/// Task sets a worker can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskSet {
    /// `diag.add`, `diag.echo`, `diag.sleep`, `diag.fail` (queue `celery`).
    Diag,
    /// The `billing.*` tasks (queue `billing`); needs the ledger and the gateway settings.
    Billing,
}

/// Runs billing and diagnostic tasks from RabbitMQ queues, storing results in Redis.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,

    #[command(flatten)]
    billing: BillingArgs,

    /// Task sets to register, comma-separated.
    #[arg(
        long,
        env = "WORKER_TASKS",
        default_value = "diag,billing",
        value_delimiter = ','
    )]
    tasks: Vec<TaskSet>,

    /// Queues to consume, comma-separated (default: `celery` for diag, `billing` for billing).
    #[arg(long, short = 'Q', env = "WORKER_QUEUES", value_delimiter = ',')]
    queues: Vec<String>,

    /// Tasks run at once.
    #[arg(long, short = 'c', env = "WORKER_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,

    /// Messages taken from the broker ahead of running them (default: 4 × concurrency).
    #[arg(long, env = "WORKER_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: Option<u16>,

    /// Node name shown to Celery tools; %h expands to the host name.
    #[arg(
        long,
        short = 'n',
        env = "WORKER_HOSTNAME",
        default_value = "celery@%h"
    )]
    hostname: String,

    /// Seconds running tasks get to finish after SIGTERM before their messages are given back.
    #[arg(long, env = "WORKER_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,

    /// Seconds results are kept in the backend.
    #[arg(long, env = "RESULT_EXPIRES", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    result_expires: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = parse_or_exit();
    task_core::telemetry::init(cli.connection.log_format);
    if let Some(q) = cli.queues.iter().find(|q| q.trim().is_empty()) {
        anyhow::bail!("WORKER_QUEUES: empty queue name in {q:?}");
    }

    let broker = AnyBroker::connect(&cli.connection.broker_url).await?;
    let backend = AnyBackend::connect(&cli.connection.result_backend)
        .await?
        .with_ttl(Duration::from_secs(cli.result_expires));

    let mut registry = Registry::new();
    let mut queues = cli.queues.clone();
    if cli.tasks.contains(&TaskSet::Diag) {
        task_core::diag::register(&mut registry);
        if cli.queues.is_empty() {
            queues.push(task_core::client::DEFAULT_QUEUE.to_owned());
        }
    }
    if cli.tasks.contains(&TaskSet::Billing) {
        let tasks = Client::new(broker.clone(), backend.clone());
        let billing = cli.billing.connect(tasks).await?;
        billing_tasks::tasks::register(&mut registry, billing, cli.billing.outbox()?);
        if cli.queues.is_empty() {
            queues.push(cli.billing.billing_queue.clone());
        }
    }
    if queues.is_empty() {
        anyhow::bail!("WORKER_TASKS: no task set chosen (diag, billing)");
    }

    let concurrency = usize::from(cli.concurrency);
    let config = WorkerConfig {
        hostname: cli.hostname.replace("%h", &task_core::hostname()),
        queues,
        concurrency,
        prefetch: cli
            .prefetch
            .unwrap_or_else(|| task_core::worker::default_prefetch(concurrency)),
        shutdown_timeout: Duration::from_secs(cli.shutdown_timeout),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(config, registry, broker.clone(), backend);
    tokio::select! {
        result = worker.run(task_core::shutdown::signal()) => { result?; }
        _ = async {
            task_core::shutdown::signal().await;
            task_core::shutdown::signal().await;
        } => {
            tracing::warn!("second signal: stopping now; unfinished messages will be redelivered");
        }
    }
    broker.close().await;
    Ok(())
}
