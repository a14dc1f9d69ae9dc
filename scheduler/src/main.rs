//! `scheduler`: the beat. Sends periodic tasks from a schedule file (and entries added at run
//! time) to RabbitMQ; run as many replicas as you like, one leads at a time.
//!
//! Configuration comes from flags or the environment (ARCHITECTURE.md §3.4); `scheduler --help`
//! lists both. A bad setting or a malformed schedule file stops it at start-up with one line
//! naming the problem (exit code 2). SIGTERM or SIGINT releases the lease and stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use scheduler::{AppState, Beat, BeatConfig, ConfigError, Metrics, Store};
use task_core::cli::{ConnectionArgs, parse_or_exit};

/// Sends periodic tasks on cron and interval schedules, exactly once per tick across replicas.
#[derive(Debug, Parser)]
#[command(name = "scheduler", version)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,

    /// Schedule file (TOML, `[[entry]]` tables) giving the initial entries; re-applied at each
    /// start. The default is the billing schedule, relative to the workspace root.
    #[arg(long, env = "SCHEDULE_FILE", default_value = scheduler::DEFAULT_SCHEDULE_FILE)]
    schedule: PathBuf,

    /// Address serving /metrics and /healthz.
    #[arg(long, env = "METRICS_BIND", default_value = "127.0.0.1:9809")]
    metrics_bind: SocketAddr,

    /// This replica's name in the leader lease (default beat@<host>-<pid>).
    #[arg(long, env = "SCHEDULER_NODE_ID", value_parser = non_empty)]
    node_id: Option<String>,

    /// Prefix of the scheduler's Redis keys (use a hash tag, e.g. {tq:beat}:, on Redis Cluster).
    #[arg(long, env = "SCHEDULER_KEY_PREFIX", default_value = scheduler::DEFAULT_KEY_PREFIX, value_parser = non_empty)]
    key_prefix: String,
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    task_core::telemetry::init(cli.connection.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scheduler: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The file first: a schedule that cannot be used stops us before we connect to anything.
    let entries = scheduler::config::load(&cli.schedule)?;
    let node_id = cli
        .node_id
        .unwrap_or_else(|| format!("beat@{}-{}", task_core::hostname(), std::process::id()));

    let client = cli
        .connection
        .client()
        .await
        .context("cannot connect to the broker or the result backend")?;
    let store = Store::connect(&cli.connection.result_backend, &cli.key_prefix).await?;
    store
        .seed(&entries)
        .await
        .context("cannot store the schedule")?;
    tracing::info!(
        file = %cli.schedule.display(),
        entries = entries.len(),
        "schedule file applied"
    );

    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let beat =
        Beat::new(store.clone(), client.clone(), BeatConfig::new(&node_id)).with_metrics(metrics);

    let listener = tokio::net::TcpListener::bind(cli.metrics_bind)
        .await
        .with_context(|| format!("METRICS_BIND {}: cannot listen", cli.metrics_bind))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
    let app = scheduler::app(AppState::new(registry, store, beat.role(), &node_id));
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
    });

    let result = beat.run(task_core::shutdown::signal()).await;
    let _ = stop_http.send(());
    let _ = http.await;
    client.broker().close().await;
    result?;
    Ok(())
}
