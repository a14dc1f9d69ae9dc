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
//! - **Graceful shutdown.** When `shutdown` resolves the worker stops consuming, gives back
//!   messages it has not started, lets running tasks finish within
//!   [`WorkerConfig::shutdown_timeout`], and returns; anything still unacknowledged is redelivered.

mod execute;
mod rate_limit;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::backend::AnyBackend;
use crate::broker::{AnyBroker, Broker};
use crate::client::{Client, DEFAULT_QUEUE};
use crate::error::Result;
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
            clock: crate::Clock::system(),
        }
    }
}

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
    /// Messages discarded as expired.
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
}

/// A worker: a registry of tasks, a broker to consume from and a backend to store results in.
#[derive(Debug)]
pub struct Worker {
    state: Arc<State>,
}

/// Shared by every in-flight message.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: WorkerConfig,
    pub(crate) registry: Registry,
    pub(crate) client: Client,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) limiter: rate_limit::Limiter,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) stopping: watch::Receiver<bool>,
    stop_tx: watch::Sender<bool>,
}

impl State {
    pub(crate) fn broker(&self) -> &AnyBroker {
        self.client.broker()
    }
    pub(crate) fn backend(&self) -> &AnyBackend {
        self.client.backend()
    }
}

impl Worker {
    /// A worker running `registry`'s tasks.
    pub fn new(
        config: WorkerConfig,
        registry: Registry,
        broker: impl Into<AnyBroker>,
        backend: impl Into<AnyBackend>,
    ) -> Self {
        let (stop_tx, stopping) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        Worker {
            state: Arc::new(State {
                client: Client::new(broker, backend),
                registry,
                slots,
                limiter: rate_limit::Limiter::default(),
                stats: Arc::default(),
                stopping,
                stop_tx,
                config,
            }),
        }
    }

    /// Live counters (shared with the running worker).
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.state.stats.clone()
    }

    /// Consumes until `shutdown` resolves, then drains as described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Arc<WorkerStats>> {
        let state = self.state;
        let config = &state.config;
        let mut consumer = state
            .broker()
            .consume(&config.queues, config.prefetch)
            .await?;
        tracing::info!(
            hostname = %config.hostname,
            queues = ?config.queues,
            concurrency = config.concurrency,
            prefetch = config.prefetch,
            tasks = ?state.registry.names().collect::<Vec<_>>(),
            "worker ready"
        );
        let mut in_flight = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                delivery = consumer.next() => match delivery {
                    Some(d) => {
                        state.stats.received.fetch_add(1, Ordering::Relaxed);
                        in_flight.spawn(execute::handle(state.clone(), d));
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
        consumer.cancel().await;
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
        tracing::info!(stats = ?state.stats.snapshot(), "worker stopped");
        Ok(state.stats.clone())
    }
}
