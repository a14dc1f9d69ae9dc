//! The task monitor: a durable record of what the fleet did, and Flower's HTTP API over it.
//!
//! - [`intake`]: Celery events from a named durable queue bound to `celeryev`, in batches, into
//!   PostgreSQL ([`store`]), acknowledged only after the commit, so events sent while the monitor
//!   is down are not lost (within the queue's bounds).
//! - [`event`]: how events fold into one row per task and per worker, with Celery's precedence.
//! - [`app`]: the axum router: Flower's `/api/...` routes with Flower's JSON shapes, `/metrics`
//!   ([`metrics`]), `/livez`, `/readyz`.
//! - [`inspect`]: worker details from remote control, cached.
//! - [`run`]: the whole monitor until a shutdown signal.

pub mod access;
pub mod actions;
pub mod api;
pub mod audit;
pub mod beat;
pub mod broker;
pub mod broker_api;
pub mod config;
pub mod dead_letters;
mod error;
pub mod event;
mod flower_metrics;
pub mod inspect;
pub mod intake;
pub mod jobs;
pub mod metrics;
mod pages;
pub mod queue_actions;
pub mod reconcile;
pub mod retention;
pub mod search;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use serde_json::Value;
use task_core::{AmqpBroker, AnyBroker, Client};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use api::app;
pub use config::Config;
pub use error::{Error, Result};
pub use store::Store;

use crate::broker::{EventsQueue, QueueProbe, QueueStats};
use crate::broker_api::BrokerApi;
use crate::inspect::Inspector;
use crate::intake::{IntakeConfig, IntakeStatus};
use crate::metrics::Metrics;

/// What the HTTP handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    client: Client,
    broker: AmqpBroker,
    inspector: Inspector,
    probe: QueueProbe,
    broker_api: Option<BrokerApi>,
    metrics: Metrics,
    intake: Arc<IntakeStatus>,
    updates: tokio::sync::broadcast::Sender<intake::Update>,
    inspect_timeout: std::time::Duration,
    access: Arc<access::Access>,
    beat: scheduler::Store,
}

impl AppState {
    /// Connects to the broker and the result backend named by `config`, over `store`.
    pub async fn connect(config: &Config, store: Store) -> Result<Self> {
        let client = Client::connect(&config.broker_url, &config.result_backend).await?;
        let broker = match client.broker() {
            AnyBroker::Amqp(b) => b.clone(),
            AnyBroker::Memory(_) => {
                return Err(Error::Config(
                    "BROKER_URL must be an amqp:// URL: the monitor reads events from RabbitMQ"
                        .into(),
                ));
            }
        };
        let broker_api = config
            .broker_api
            .as_deref()
            .map(|api| BrokerApi::new(api, &broker_api::vhost_of(&config.broker_url)))
            .transpose()?;
        Ok(AppState {
            inner: Arc::new(Shared {
                broker_api,
                store,
                inspector: Inspector::new(
                    broker.clone(),
                    config.inspect_timeout,
                    config.inspect_cache,
                ),
                probe: QueueProbe::new(config.broker_url.clone()),
                client,
                broker,
                metrics: Metrics::with_flower_aliases(config.flower_metrics),
                intake: Arc::default(),
                updates: tokio::sync::broadcast::channel(64).0,
                inspect_timeout: config.inspect_timeout,
                access: Arc::new(access::Access::from_config(config)?),
                beat: scheduler::Store::connect_lazy(
                    &config.result_backend,
                    &config.scheduler_prefix,
                )
                .map_err(|e| {
                    Error::Config(format!(
                        "the scheduler's store (RESULT_BACKEND, SCHEDULER_KEY_PREFIX): {e}"
                    ))
                })?,
            }),
        })
    }

    /// The broker, for what only RabbitMQ does (reading a queue without consuming it).
    pub fn amqp(&self) -> &AmqpBroker {
        &self.inner.broker
    }
    /// The scheduler's store (its entries, their state, the leader lease).
    pub fn beat(&self) -> &scheduler::Store {
        &self.inner.beat
    }
    /// Who may sign in and what they may do.
    pub fn access(&self) -> &Arc<access::Access> {
        &self.inner.access
    }
    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    /// The task-queue client (sending, revoking, results).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }
    /// The inspect cache.
    pub fn inspector(&self) -> &Inspector {
        &self.inner.inspector
    }
    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    /// What the intake has done.
    pub fn intake_status(&self) -> &Arc<IntakeStatus> {
        &self.inner.intake
    }
    /// Announcements of committed batches (what `/live` streams).
    pub fn updates(&self) -> &tokio::sync::broadcast::Sender<intake::Update> {
        &self.inner.updates
    }
    /// How long one remote-control broadcast waits for replies.
    pub fn inspect_timeout(&self) -> std::time::Duration {
        self.inner.inspect_timeout
    }
    /// The queue probe.
    pub fn queue_probe(&self) -> &QueueProbe {
        &self.inner.probe
    }

    /// Sends a control command to one worker and collects its reply.
    pub async fn control(
        &self,
        method: &str,
        arguments: Value,
        worker: &str,
    ) -> Result<Vec<(String, Value)>> {
        Ok(task_core::control::broadcast(
            &self.inner.broker,
            method,
            arguments,
            Some(&[worker.to_owned()]),
            self.inner.inspect_timeout,
            Some(1),
        )
        .await?)
    }

    /// Sends a control command to one worker without waiting for a reply.
    pub async fn cast(&self, method: &str, arguments: Value, worker: &str) -> Result<()> {
        Ok(task_core::control::cast(
            &self.inner.broker,
            method,
            arguments,
            Some(&[worker.to_owned()]),
        )
        .await?)
    }

    /// Whether [`AppState::queue_stats`] lists every queue (the management API is configured).
    pub fn lists_all_queues(&self) -> bool {
        self.inner.broker_api.is_some()
    }

    /// Statistics of every lasting queue of the virtual host when the management API is
    /// configured (`MONITOR_BROKER_API`); otherwise of every queue the workers report consuming
    /// (missing queues left out), without unacknowledged counts or ages.
    pub async fn queue_stats(&self) -> Result<Vec<(String, QueueStats)>> {
        self.queue_stats_with(None).await
    }

    /// [`AppState::queue_stats`] for a scrape: never waits for the workers' replies. Without the
    /// management API it uses the queues of the last refresh of the inspect cache and, when
    /// that is stale, refreshes it in the background for the next scrape.
    pub async fn queue_stats_now(&self) -> Result<Vec<(String, QueueStats)>> {
        let (mut names, stale, never) = self.inner.inspector.known_queue_names();
        if stale && self.inner.broker_api.is_none() {
            let state = self.clone();
            let refresh = tokio::spawn(async move {
                if let Err(e) = state.inner.inspector.workers(false, None).await {
                    tracing::warn!(error = %e, "cannot refresh the workers' queues");
                }
            });
            // The first scrape waits for the first refresh (which goes on if the scraper gives
            // up); later ones answer from the last one.
            if never {
                let _ = refresh.await;
                names = self.inner.inspector.known_queue_names().0;
            }
        }
        self.queue_stats_with(Some(names)).await
    }

    async fn queue_stats_with(
        &self,
        known: Option<Vec<String>>,
    ) -> Result<Vec<(String, QueueStats)>> {
        if let Some(api) = &self.inner.broker_api {
            let now = task_core::events::unix_now();
            return Ok(api
                .queues()
                .await?
                .into_iter()
                .map(|q| {
                    let stats = QueueStats {
                        messages: q.messages_ready.unwrap_or(0),
                        consumers: q.consumers.unwrap_or(0),
                        unacked: q.messages_unacknowledged,
                        oldest_age: q.oldest_age(now),
                        dead_lettering: q.dead_lettering(),
                    };
                    (q.name, stats)
                })
                .collect());
        }
        let mut names = match known {
            Some(names) => names,
            None => self.inner.inspector.queue_names().await?,
        };
        // A queue the monitor paused has no consumer, and still belongs on the list.
        for q in queue_actions::paused_names(self).await {
            if !names.contains(&q) {
                names.push(q);
            }
        }
        let mut out = Vec::new();
        for name in names {
            if let Some(stats) = self.inner.probe.stats(&name).await? {
                out.push((name, stats));
            }
        }
        Ok(out)
    }
}

impl Config {
    /// The intake's part of the settings.
    pub fn intake(&self) -> IntakeConfig {
        IntakeConfig {
            broker_url: self.broker_url.clone(),
            queue: EventsQueue {
                name: self.events_queue.clone(),
                max_length: self.events_max_length,
                ttl: self.events_ttl,
                expires: self.events_queue_expires,
            },
            batch_size: self.batch_size,
            batch_wait: self.batch_wait,
        }
    }
}

/// A started monitor: the store migrated, the events queue declared, the intake running.
#[derive(Debug)]
pub struct Monitor {
    state: AppState,
    stop: watch::Sender<bool>,
    intake: tokio::task::JoinHandle<Result<()>>,
}

impl Monitor {
    /// Connects everything `config` names and starts the intake.
    pub async fn start(config: &Config) -> Result<Self> {
        let store = Store::connect(&config.database_url, 8).await?;
        let state = AppState::connect(config, store.clone()).await?;
        let intake_config = config.intake();
        intake::declare(&intake_config).await?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(reconcile::run(
            state.clone(),
            config.reconcile_every,
            stopped.clone(),
        ));
        tokio::spawn(retention::run(
            store.clone(),
            config.retention.clone(),
            config.retention_every,
            state.metrics().clone(),
            stopped.clone(),
        ));
        let intake = tokio::spawn(intake::run(
            intake_config,
            store,
            state.metrics().clone(),
            state.intake_status().clone(),
            state.updates().clone(),
            stopped,
        ));
        if let Err(e) = jobs::resume_all(&state).await {
            tracing::error!(error = %e, "cannot resume the bulk jobs left running");
        }
        Ok(Monitor {
            state,
            stop,
            intake,
        })
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The router over this monitor.
    pub fn router(&self) -> axum::Router {
        app(self.state.clone())
    }

    /// Stops the intake (a batch being written is finished and acknowledged) and closes the
    /// connections.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let result = self
            .intake
            .await
            .map_err(|e| Error::Unavailable(format!("the event intake panicked: {e}")))?;
        self.state.client().broker().close().await;
        self.state.store().close().await;
        result
    }
}

/// Runs the monitor on `config.bind` until `shutdown` resolves. Refuses a non-loopback address
/// without authentication (see [`Config::check_bind`]).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.check_bind()?;
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|e| Error::Config(format!("cannot bind MONITOR_BIND {}: {e}", config.bind)))?;
    serve(config, listener, shutdown).await
}

/// Runs the monitor on `listener` until `shutdown` resolves or the intake fails for good.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut monitor = Monitor::start(&config).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, queue = config.events_queue, "monitor serving the API, /metrics, /livez and /readyz");
    let server = axum::serve(listener, monitor.router()).with_graceful_shutdown(shutdown);
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        served = &mut server => {
            served?;
            monitor.stop().await
        }
        ended = &mut monitor.intake => {
            // The intake only ends by itself on a configuration error.
            let ended = ended.map_err(|e| Error::Unavailable(format!("the event intake panicked: {e}")))?;
            ended.and(Err(Error::Unavailable("the event intake stopped".into())))
        }
    }
}
