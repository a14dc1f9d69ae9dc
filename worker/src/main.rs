//! `worker`: runs billing and diagnostic tasks from RabbitMQ queues and stores their results in
//! Redis.
//!
//! Configuration comes from flags or the environment (ARCHITECTURE.md §3.4); `worker --help` lists
//! both. SIGTERM or SIGINT starts a graceful shutdown; a second one stops at once.

use std::time::Duration;

use anyhow::Context as _;
use billing_tasks::config::BillingArgs;
use clap::{Parser, ValueEnum};
use task_core::cli::{ConnectionArgs, parse_or_exit};
use task_core::coord::Coordinator;
use task_core::health::ReadinessCheck;
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

    /// Messages taken from the broker ahead of running them (default: multiplier × concurrency).
    #[arg(long, env = "WORKER_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: Option<u16>,

    /// Messages taken ahead per concurrency slot when WORKER_PREFETCH is not set (Celery's
    /// `worker_prefetch_multiplier`). Keep it low for long tasks: a prefetched message waits
    /// unacknowledged, and RabbitMQ's `consumer_timeout` counts that wait.
    #[arg(long, env = "WORKER_PREFETCH_MULTIPLIER", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch_multiplier: u16,

    /// Node name shown to Celery tools; %h expands to the host name. Default `celery@%h`, made
    /// unique per process when another node already answers to it.
    #[arg(long, short = 'n', env = "WORKER_HOSTNAME")]
    hostname: Option<String>,

    /// Send task events from the start (Celery's -E); `celery control enable_events` and Flower
    /// turn them on at run time too.
    #[arg(long = "events", short = 'E', env = "WORKER_SEND_TASK_EVENTS", action = clap::ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    task_events: bool,

    /// Where /metrics, /livez and /readyz are served (`off` to serve nothing).
    #[arg(long, env = "METRICS_BIND", default_value = "127.0.0.1:9808")]
    metrics_bind: String,

    /// Seconds a revoke holds (at least the longest delay a message may wait).
    #[arg(long, env = "WORKER_REVOKE_TTL", default_value_t = task_core::worker::DEFAULT_REVOKE_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    revoke_ttl: u64,

    /// Prefix of the keys revokes and limits are shared under in the result backend's Redis
    /// (several clusters can share one Redis with different prefixes).
    #[arg(long, env = "COORDINATION_PREFIX", default_value = task_core::coord::DEFAULT_PREFIX)]
    coordination_prefix: String,

    /// Report task failures and panics to Sentry at this DSN.
    #[arg(long, env = "SENTRY_DSN")]
    sentry_dsn: Option<String>,

    /// Seconds running tasks get to finish after SIGTERM before their messages are given back.
    #[arg(long, env = "WORKER_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,

    /// Time zone a naive `eta` or `expires` (one without a UTC offset) is read in: Celery's
    /// `timezone` setting, an IANA name such as Europe/Moscow.
    #[arg(long, env = "WORKER_TIMEZONE", default_value = "UTC", value_parser = parse_timezone)]
    timezone: task_core::clock::Tz,

    /// Seconds results are kept in the backend.
    #[arg(long, env = "RESULT_EXPIRES", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    result_expires: u64,

    /// How results are stored: `json` (Celery's default) or `msgpack`, as Celery's
    /// `result_serializer`; results are read in either form.
    #[arg(long, env = "RESULT_SERIALIZER", default_value = "json", value_parser = parse_serializer)]
    result_serializer: task_core::protocol::ContentType,
}

fn parse_serializer(name: &str) -> Result<task_core::protocol::ContentType, String> {
    match name {
        "json" => Ok(task_core::protocol::ContentType::Json),
        "msgpack" => Ok(task_core::protocol::ContentType::Msgpack),
        other => Err(format!(
            "`{other}` is not a result serializer (json or msgpack)"
        )),
    }
}

fn parse_timezone(name: &str) -> Result<task_core::clock::Tz, String> {
    name.parse()
        .map_err(|_| format!("`{name}` is not an IANA time zone name (e.g. UTC, Europe/Moscow)"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli: Cli = parse_or_exit();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever RUST_BACKTRACE says: the error names the setting or the service.
            eprintln!("worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    task_core::telemetry::init(cli.connection.log_format);
    let _sentry = task_core::telemetry::init_sentry(cli.sentry_dsn.as_deref());
    if let Some(q) = cli.queues.iter().find(|q| q.trim().is_empty()) {
        anyhow::bail!("WORKER_QUEUES: empty queue name in {q:?}");
    }
    let metrics_listener = match cli.metrics_bind.as_str() {
        "off" => None,
        bind => Some(
            tokio::net::TcpListener::bind(bind)
                .await
                .map_err(|e| anyhow::anyhow!("METRICS_BIND: cannot listen on {bind}: {e}"))?,
        ),
    };

    let broker = cli.connection.broker().await?;
    let backend = AnyBackend::connect_with_broker(&cli.connection.result_backend, &broker)
        .await?
        .with_ttl(Duration::from_secs(cli.result_expires))
        .with_serializer(cli.result_serializer);

    let coordinator = match &backend {
        AnyBackend::Redis(redis) => {
            Coordinator::from_backend(redis).with_prefix(cli.coordination_prefix.clone())
        }
        AnyBackend::Memory(_) => Coordinator::memory(),
        AnyBackend::Rpc(_) => {
            tracing::warn!(
                "RESULT_BACKEND rpc:// has no shared store: revokes and limits are this worker's \
                 own, and a duplicate delivery is recognised only in this process"
            );
            Coordinator::memory()
        }
    };
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
        let billing = cli
            .billing
            .connect(tasks)
            .await?
            .with_flow(cli.billing.flow(coordinator.clone()));
        billing_tasks::tasks::register(&mut registry, billing, cli.billing.outbox()?);
        if cli.queues.is_empty() {
            queues.push(cli.billing.billing_queue.clone());
        }
    }
    if queues.is_empty() {
        anyhow::bail!("WORKER_TASKS: no task set chosen (diag, billing)");
    }

    let explicit = cli.hostname.is_some();
    let mut hostname = cli
        .hostname
        .as_deref()
        .unwrap_or("celery@%h")
        .replace("%h", &task_core::hostname());
    if let AnyBroker::Amqp(amqp) = &broker {
        hostname = task_core::control::unique_hostname(
            amqp,
            &hostname,
            explicit,
            Duration::from_millis(500),
        )
        .await;
    }
    let concurrency = usize::from(cli.concurrency);
    let config = WorkerConfig {
        hostname,
        queues,
        concurrency,
        prefetch: cli.prefetch.unwrap_or_else(|| {
            u16::try_from(concurrency * usize::from(cli.prefetch_multiplier)).unwrap_or(u16::MAX)
        }),
        shutdown_timeout: Duration::from_secs(cli.shutdown_timeout),
        task_events: cli.task_events,
        revoke_ttl: Duration::from_secs(cli.revoke_ttl),
        clock: task_core::Clock::system().with_timezone(cli.timezone),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(config, registry, broker.clone(), backend)
        .with_coordinator(coordinator.clone());
    if let Some(listener) = metrics_listener {
        let checks = vec![
            ReadinessCheck::new("broker", {
                let broker = broker.clone();
                move || {
                    let broker = broker.clone();
                    async move { broker.ping().await.map_err(|e| e.to_string()) }
                }
            }),
            ReadinessCheck::new("backend", move || {
                let coordinator = coordinator.clone();
                async move { coordinator.ping().await.map_err(|e| e.to_string()) }
            }),
        ];
        let app = task_core::health::app(worker.metrics(), checks);
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /livez and /readyz");
        tokio::spawn(async move {
            if let Err(e) = task_core::health::serve(listener, app, std::future::pending()).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
    // The consuming loop runs on a runtime thread, not on this one (`block_on`'s): the tasks it
    // spawns for each delivery then start from that thread's own queue instead of waking a
    // parked thread through the shared one.
    let mut running = tokio::spawn(worker.run(task_core::shutdown::signal()));
    tokio::select! {
        result = &mut running => { result.context("the worker's loop panicked")??; }
        _ = async {
            task_core::shutdown::signal().await;
            task_core::shutdown::signal().await;
        } => {
            tracing::warn!("second signal: stopping now; unfinished messages will be redelivered");
            running.abort();
        }
    }
    broker.close().await;
    Ok(())
}
