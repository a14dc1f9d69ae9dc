//! The worker runtime: consume, run with bounded concurrency, store the result, then acknowledge.
//!
//! Guarantees (ARCHITECTURE.md §4):
//! - **At least once.** A message is acknowledged only after its result (or its retry, or its
//!   dead-letter copy) is safely stored or published. A worker killed at any point loses nothing:
//!   the broker redelivers what it had not acknowledged. A redelivered message whose task already
//!   reached a ready state is acknowledged without running it again.
//! - **Delays are not held.** A message whose ETA is further away than [`WorkerConfig::eta_hold`]
//!   goes back to the broker's delay queues and is acknowledged; only the last moments of a wait
//!   are spent holding it.
//! - **Bad input does not stop the worker.** Undecodable messages, unknown tasks and arguments of
//!   the wrong shape go to the queue's dead-letter queue with a reason, are recorded as FAILURE when
//!   their id is known, and are logged once.
//! - **Revokes hold.** A revoked id is kept in memory and, with a coordinator, in Redis (so it
//!   survives restarts and reaches workers started later); it is checked when a message arrives,
//!   when its ETA comes and just before it starts. `revoke --terminate` stops a running task.
//! - **Limits do not take slots.** Rate and per-key limits are waited for before a message takes a
//!   concurrency slot, so a limited task type never starves the others.
//! - **Visible to Celery's tools.** With an AMQP broker the worker sends Celery events and answers
//!   remote control (see [`crate::events`], [`crate::control`] and `control.rs` here).
//! - **Graceful shutdown.** When `shutdown` resolves (or a remote `shutdown` arrives) the worker
//!   stops consuming, gives back messages it has not started, lets running tasks finish within
//!   [`WorkerConfig::shutdown_timeout`], and returns; anything still unacknowledged is redelivered.

mod control;
mod execute;
mod flow;
mod order;
pub mod requests;
mod revoked;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::AnyBackend;
use crate::backoff::RateLimit;
use crate::broker::{AnyBroker, Broker, Consumer};
use crate::client::{Client, DEFAULT_QUEUE};
use crate::coord::Coordinator;
use crate::error::Result;
use crate::events::{EventSink, Events, LamportClock};
use crate::metrics::WorkerMetrics;
use crate::registry::Registry;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Node name, as Celery's `-n` (default `celery@<host>`).
    pub hostname: String,
    /// Queues to consume (default `celery`).
    pub queues: Vec<String>,
    /// Tasks running at once.
    pub concurrency: usize,
    /// Unacknowledged messages held at once (the AMQP prefetch count).
    pub prefetch: u16,
    /// How long running tasks may take to finish after shutdown begins.
    pub shutdown_timeout: Duration,
    /// Longest wait for an ETA that is held in the worker rather than given back to the broker.
    pub eta_hold: Duration,
    /// Store name, args, kwargs, worker, retries and queue with results (Celery's
    /// `result_extended`).
    pub result_extended: bool,
    /// Send `task-*` events from the start (Celery's `-E`); `enable_events` turns them on later.
    pub task_events: bool,
    /// How long a revoke holds (at least the longest delay a message may wait).
    pub revoke_ttl: Duration,
    /// Wall clock for ETAs and expiry (the system clock; tests inject one).
    pub clock: crate::Clock,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let concurrency = 16;
        WorkerConfig {
            hostname: format!("celery@{}", crate::hostname()),
            queues: vec![DEFAULT_QUEUE.to_owned()],
            concurrency,
            prefetch: default_prefetch(concurrency),
            shutdown_timeout: Duration::from_secs(30),
            eta_hold: Duration::from_secs(1),
            result_extended: true,
            task_events: false,
            revoke_ttl: DEFAULT_REVOKE_TTL,
            clock: crate::Clock::system(),
        }
    }
}

/// Default life of a revoke: longer than the longest single delay hop (2²² s ≈ 48.5 days).
pub const DEFAULT_REVOKE_TTL: Duration = Duration::from_secs(50 * 24 * 3600);

/// Celery's default prefetch: four messages per concurrency slot.
pub fn default_prefetch(concurrency: usize) -> u16 {
    u16::try_from(concurrency.saturating_mul(4))
        .unwrap_or(u16::MAX)
        .max(1)
}

/// Counters of what a worker did.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Messages taken from the broker.
    pub received: AtomicU64,
    /// Tasks that returned a value.
    pub succeeded: AtomicU64,
    /// Tasks that ended in FAILURE (including time limits and panics).
    pub failed: AtomicU64,
    /// Retries scheduled.
    pub retried: AtomicU64,
    /// Messages dead-lettered as bad input.
    pub dead_lettered: AtomicU64,
    /// Messages discarded as expired or revoked, and tasks terminated.
    pub revoked: AtomicU64,
    /// Messages handed back to the broker's delay queues.
    pub deferred: AtomicU64,
    /// Redelivered messages whose task had already finished.
    pub duplicates: AtomicU64,
}

impl WorkerStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> [(&'static str, u64); 8] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("received", l(&self.received)),
            ("succeeded", l(&self.succeeded)),
            ("failed", l(&self.failed)),
            ("retried", l(&self.retried)),
            ("dead_lettered", l(&self.dead_lettered)),
            ("revoked", l(&self.revoked)),
            ("deferred", l(&self.deferred)),
            ("duplicates", l(&self.duplicates)),
        ]
    }

    /// Tasks that finished (Celery's `processed`).
    pub fn processed(&self) -> u64 {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        l(&self.succeeded) + l(&self.failed) + l(&self.retried) + l(&self.revoked)
    }
}

/// A worker: a registry of tasks, a broker to consume from and a backend to store results in.
#[derive(Debug)]
pub struct Worker {
    state: Arc<State>,
    commands: mpsc::Receiver<Command>,
}

/// Changes to the consumer that remote control asks the run loop for.
#[derive(Debug)]
pub(crate) enum Command {
    AddQueue(String),
    CancelQueue(String),
    SetPrefetch(u16),
    Shutdown,
}

/// Limits changed at run time (`rate_limit`, `time_limit` control commands).
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    /// `Some(None)`: rate limit removed.
    pub(crate) rate_limit: Option<Option<RateLimit>>,
    pub(crate) soft_time_limit: Option<Option<Duration>>,
    pub(crate) time_limit: Option<Option<Duration>>,
}

/// Shared by every in-flight message.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: WorkerConfig,
    pub(crate) hostname: String,
    pub(crate) registry: Registry,
    pub(crate) client: Client,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) concurrency: AtomicUsize,
    pub(crate) prefetch: AtomicUsize,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) stopping: watch::Receiver<bool>,
    stop_tx: watch::Sender<bool>,
    pub(crate) events: Events,
    pub(crate) requests: requests::Requests,
    pub(crate) revoked: revoked::RevokedSet,
    pub(crate) coordinator: Coordinator,
    pub(crate) metrics: WorkerMetrics,
    pub(crate) overrides: Mutex<HashMap<String, Overrides>>,
    /// Rate limits set at run time anywhere in the cluster (the coordinator's copy).
    pub(crate) shared_rates: Mutex<HashMap<String, RateLimit>>,
    pub(crate) totals: Mutex<BTreeMap<String, u64>>,
    pub(crate) queues: Mutex<Vec<String>>,
    pub(crate) started: std::time::Instant,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) limit_waiters: AtomicUsize,
    /// Concurrency permits to give back (see `flow::release_loop`).
    pub(crate) releases: mpsc::UnboundedSender<(String, String)>,
    /// Arrival order for taking slots (see `order`).
    pub(crate) line: Arc<order::Line>,
    releases_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, String)>>>,
}

impl State {
    pub(crate) fn broker(&self) -> &AnyBroker {
        self.client.broker()
    }
    pub(crate) fn backend(&self) -> &AnyBackend {
        self.client.backend()
    }
    pub(crate) fn coordinator(&self) -> Coordinator {
        self.coordinator.clone()
    }
    /// Run-time limits of `task`; a rate limit set anywhere in the cluster wins over one set
    /// only here.
    pub(crate) fn overrides(&self, task: &str) -> Overrides {
        let mut o = self
            .overrides
            .lock()
            .expect("overrides lock")
            .get(task)
            .cloned()
            .unwrap_or_default();
        if let Some(rate) = self.shared_rates.lock().expect("rates lock").get(task) {
            o.rate_limit = Some(Some(*rate));
        }
        o
    }
}

impl Worker {
    /// A worker running `registry`'s tasks. Call inside a tokio runtime: with an AMQP broker it
    /// starts its event publisher.
    pub fn new(
        config: WorkerConfig,
        registry: Registry,
        broker: impl Into<AnyBroker>,
        backend: impl Into<AnyBackend>,
    ) -> Self {
        let broker = broker.into();
        let sink = EventSink::for_broker(&broker);
        Self::with_events(config, registry, broker, backend, sink)
    }

    /// Like [`Worker::new`] with events sent to `sink`.
    pub fn with_events(
        config: WorkerConfig,
        registry: Registry,
        broker: impl Into<AnyBroker>,
        backend: impl Into<AnyBackend>,
        sink: EventSink,
    ) -> Self {
        let (stop_tx, stopping) = watch::channel(false);
        let (commands, commands_rx) = mpsc::channel(64);
        let (releases, releases_rx) = mpsc::unbounded_channel();
        let concurrency = config.concurrency.max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        let clock = Arc::new(LamportClock::default());
        let events = Events::with_clock(sink, config.hostname.clone(), config.task_events, clock);
        let metrics = WorkerMetrics::new(&config.hostname);
        metrics.set_concurrency(concurrency);
        registry.names().for_each(|t| metrics.track_task(t));
        Worker {
            state: Arc::new(State {
                hostname: config.hostname.clone(),
                client: Client::new(broker, backend),
                registry,
                slots,
                concurrency: AtomicUsize::new(concurrency),
                prefetch: AtomicUsize::new(usize::from(config.prefetch.max(1))),
                stats: Arc::default(),
                stopping,
                stop_tx,
                events,
                requests: requests::Requests::default(),
                revoked: revoked::RevokedSet::default(),
                coordinator: Coordinator::memory(),
                metrics,
                overrides: Mutex::default(),
                shared_rates: Mutex::default(),
                totals: Mutex::default(),
                queues: Mutex::new(config.queues.clone()),
                started: std::time::Instant::now(),
                commands,
                limit_waiters: AtomicUsize::new(0),
                releases,
                line: Arc::default(),
                releases_rx: Mutex::new(Some(releases_rx)),
                config,
            }),
            commands: commands_rx,
        }
    }

    /// Shares revokes, rate limits and per-key limits with every worker using the same
    /// coordinator (Redis), instead of keeping them in this process only.
    pub fn with_coordinator(mut self, coordinator: Coordinator) -> Self {
        Arc::get_mut(&mut self.state)
            .expect("the worker is not running yet")
            .coordinator = coordinator;
        self
    }

    /// Records into `metrics` instead of a private set (so a `/metrics` endpoint can serve it).
    pub fn with_metrics(mut self, metrics: WorkerMetrics) -> Self {
        let state = Arc::get_mut(&mut self.state).expect("the worker is not running yet");
        metrics.set_concurrency(state.config.concurrency.max(1));
        state.registry.names().for_each(|t| metrics.track_task(t));
        state.metrics = metrics;
        self
    }

    /// Live counters (shared with the running worker).
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.state.stats.clone()
    }

    /// The worker's metrics.
    pub fn metrics(&self) -> WorkerMetrics {
        self.state.metrics.clone()
    }

    /// The worker's event dispatcher.
    pub fn events(&self) -> Events {
        self.state.events.clone()
    }

    /// Consumes until `shutdown` resolves, then drains as described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Arc<WorkerStats>> {
        let Worker {
            state,
            commands: mut commands_rx,
        } = self;
        let config = &state.config;
        state.revoked.load(&state).await;
        state.apply_shared_rate_limits().await;
        let mut queues = config.queues.clone();
        let mut prefetch = config.prefetch.max(1);
        let mut consumer: Option<Consumer> = Some(state.broker().consume(&queues, prefetch).await?);
        let (bg_stop, bg_stopped) = watch::channel(false);
        let mut background = JoinSet::new();
        background.spawn(revoked::sync_loop(state.clone(), bg_stopped.clone()));
        if let Some(rx) = state.releases_rx.lock().expect("releases lock").take() {
            background.spawn(flow::release_loop(
                state.coordinator(),
                rx,
                bg_stopped.clone(),
            ));
        }
        if let AnyBroker::Amqp(amqp) = state.broker() {
            let handler: Arc<dyn crate::control::Handler> =
                Arc::new(control::Commands(state.clone()));
            let mut stopped = bg_stopped.clone();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            background.spawn(crate::control::serve(
                amqp.clone(),
                state.hostname.clone(),
                state.events.clock().clone(),
                handler,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
                Some(ready_tx),
            ));
            // Answer `ping` before saying ready, so tools (and a second worker probing its
            // name) see this node from the moment it reports itself up.
            if tokio::time::timeout(Duration::from_secs(5), ready_rx)
                .await
                .is_err()
            {
                tracing::warn!("remote control is not answering yet; continuing");
            }
        }
        tracing::info!(
            hostname = %state.hostname,
            queues = ?queues,
            concurrency = config.concurrency,
            prefetch,
            tasks = ?state.registry.names().collect::<Vec<_>>(),
            "worker ready"
        );
        state.events.send(
            "worker-online",
            crate::events::worker_fields(0, state.stats.processed()),
        );
        // After `worker-online`, as in Celery: the loop sends its first heartbeat at once.
        background.spawn(heartbeat_loop(state.clone(), bg_stopped.clone()));

        let mut in_flight = JoinSet::new();
        let mut restart_at: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            let next = async {
                match consumer.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            };
            let restart = async {
                match restart_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                command = commands_rx.recv() => {
                    let Some(command) = command else { break };
                    let changed = match command {
                        Command::Shutdown => {
                            tracing::info!("shutdown requested by remote control");
                            break;
                        }
                        Command::AddQueue(q) if !queues.contains(&q) => { queues.push(q); true }
                        Command::CancelQueue(q) if queues.contains(&q) => { queues.retain(|x| *x != q); true }
                        Command::SetPrefetch(n) if n != prefetch => { prefetch = n; true }
                        _ => false,
                    };
                    if changed {
                        *state.queues.lock().expect("queues lock") = queues.clone();
                        if let Some(mut c) = consumer.take() {
                            c.cancel().await;
                        }
                        restart_at = Some(tokio::time::Instant::now());
                    }
                }
                _ = restart => {
                    restart_at = None;
                    if !queues.is_empty() {
                        match state.broker().consume(&queues, prefetch).await {
                            Ok(c) => {
                                tracing::info!(queues = ?queues, prefetch, "consumer restarted");
                                consumer = Some(c);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot restart the consumer; retrying in 1s");
                                restart_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                            }
                        }
                    }
                }
                delivery = next => match delivery {
                    Some(d) => {
                        state.stats.received.fetch_add(1, Ordering::Relaxed);
                        // The place is taken here, in receiving order (see `order`).
                        let place = state.line.join();
                        // Boxed: the future is large, and spawning moves it through several places.
                        in_flight.spawn(Box::pin(execute::handle(state.clone(), d, place)));
                    }
                    None => break,
                },
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            }
        }
        tracing::info!(
            in_flight = in_flight.len(),
            "shutting down: no new messages; draining"
        );
        let _ = state.stop_tx.send(true);
        if let Some(mut c) = consumer.take() {
            c.cancel().await;
        }
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = in_flight.len(),
                timeout = ?config.shutdown_timeout,
                "tasks still running at the shutdown deadline; their messages will be redelivered"
            );
            in_flight.shutdown().await;
        }
        state.events.send(
            "worker-offline",
            crate::events::worker_fields(0, state.stats.processed()),
        );
        let _ = bg_stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while background.join_next().await.is_some() {}
        })
        .await;
        background.shutdown().await;
        state.events.close(Duration::from_secs(2)).await;
        tracing::info!(stats = ?state.stats.snapshot(), "worker stopped");
        Ok(state.stats.clone())
    }
}

impl State {
    /// Takes the rate limits changed at run time on other workers (or before this one started).
    pub(crate) async fn apply_shared_rate_limits(&self) {
        match self.coordinator.rate_limits().await {
            Ok(limits) => *self.shared_rates.lock().expect("rates lock") = limits,
            Err(e) => tracing::debug!(error = %e, "cannot read shared rate limits"),
        }
    }

    /// Counts a finished task for `stats.total`.
    pub(crate) fn count_total(&self, task: &str) {
        *self
            .totals
            .lock()
            .expect("totals lock")
            .entry(task.to_owned())
            .or_default() += 1;
    }
}

/// Sends `worker-heartbeat` every [`crate::events::HEARTBEAT_FREQ`] and refreshes the gauges.
async fn heartbeat_loop(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(crate::events::HEARTBEAT_FREQ);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dropped_seen = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        send_heartbeat(&state);
        let dropped = state.events.dropped();
        for _ in dropped_seen..dropped {
            state.metrics.event_publish_failed();
        }
        dropped_seen = dropped;
        if let AnyBroker::Amqp(b) = state.broker() {
            state.metrics.set_broker_reconnects(b.reconnects());
        }
    }
}

pub(crate) fn send_heartbeat(state: &State) {
    let active = state.requests.active_count();
    state.metrics.set_active(active);
    state.metrics.set_prefetched(state.requests.waiting_count());
    state.events.send(
        "worker-heartbeat",
        crate::events::worker_fields(active, state.stats.processed()),
    );
}
