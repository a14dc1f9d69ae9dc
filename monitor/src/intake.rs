//! Durable event intake: the events queue → batches → one PostgreSQL transaction → one multiple
//! acknowledgement.
//!
//! Invariants:
//! - **Nothing is acknowledged before it is committed.** A batch's messages are acknowledged with
//!   one `basic.ack(multiple)` of its last delivery tag after [`Store::write_batch`] returns; a
//!   crash or a lost connection before that redelivers the whole batch, and writing it again gives
//!   the same rows (the merge is idempotent).
//! - **A store outage pauses intake, it loses nothing.** The batch is retried with back-off while
//!   its messages stay unacknowledged; RabbitMQ keeps the rest (up to the queue's bound).
//! - **A message that is not an event is dropped and counted**, never retried forever.
//! - Prefetch equals the batch size, so a batch fills in one round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::sync::watch;

use crate::broker::{self, EventsQueue};
use crate::error::{Error, Result};
use crate::event::{self, Event};
use crate::metrics::Metrics;
use crate::store::Store;

/// Batching of the intake.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    /// RabbitMQ URL.
    pub broker_url: String,
    /// The queue to declare and read.
    pub queue: EventsQueue,
    /// Most events per transaction.
    pub batch_size: u16,
    /// Longest wait to fill a batch once its first event arrived.
    pub batch_wait: Duration,
}

/// What the intake has done, for `/readyz` and tests.
#[derive(Debug, Default)]
pub struct IntakeStatus {
    consuming: AtomicBool,
    events: AtomicU64,
    batches: AtomicU64,
    malformed: AtomicU64,
}

impl IntakeStatus {
    /// Whether a consumer is attached to the events queue now.
    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }
    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    /// Batches committed so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Messages dropped because they were not events.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
}

/// Declares the events queue (so events are kept from now on, even before the first consume).
pub async fn declare(config: &IntakeConfig) -> Result<()> {
    let connection = broker::connect(&config.broker_url).await?;
    let ch = connection.create_channel().await?;
    let declared = config.queue.declare(&ch).await;
    let _ = connection.close(200, "declared".into()).await;
    declared
}

/// Reads events into `store` until `stop` turns true, reconnecting after failures. A
/// configuration error (the queue exists with other arguments) ends it with that error.
pub async fn run(
    config: IntakeConfig,
    store: Store,
    metrics: Metrics,
    status: Arc<IntakeStatus>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let result = session(&config, &store, &metrics, &status, &mut stop).await;
        status.consuming.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "event intake interrupted; reconnecting in {backoff:?}");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection's worth of intake: returns `Ok` only when told to stop.
async fn session(
    config: &IntakeConfig,
    store: &Store,
    metrics: &Metrics,
    status: &IntakeStatus,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let connection = broker::connect(&config.broker_url).await?;
    let ch = connection.create_channel().await?;
    config.queue.declare(&ch).await?;
    ch.basic_qos(config.batch_size.max(1), BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            config.queue.name.as_str().into(),
            format!("monitor-{}", uuid::Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    status.consuming.store(true, Ordering::Relaxed);
    tracing::info!(queue = config.queue.name, "reading events");
    let max = usize::from(config.batch_size.max(1));
    loop {
        let first = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            next = consumer.next() => next,
        };
        let first = match first {
            Some(d) => d?,
            None => {
                return Err(Error::Unavailable(
                    "the events consumer was cancelled".into(),
                ));
            }
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + config.batch_wait;
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(d)) => batch.push(d?),
                Ok(None) | Err(_) => break,
            }
        }
        let mut events: Vec<Event> = Vec::with_capacity(batch.len());
        for delivery in &batch {
            match event::decode(&delivery.data) {
                Ok(decoded) => events.extend(decoded),
                Err(e) => {
                    status.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, routing_key = %delivery.routing_key, "dropping a message that is not an event");
                }
            }
        }
        let Some(summary) = write_with_retry(store, &events, stop).await else {
            // Stopping with the batch unwritten: it stays unacknowledged and comes back.
            break;
        };
        let last = batch.last().expect("a batch has a first delivery");
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        status.batches.fetch_add(1, Ordering::Relaxed);
        status
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut newest = f64::MIN;
        for e in &events {
            metrics.event(e.get("type").and_then(Value::as_str).unwrap_or(""));
            if let Some(ts) = e.get("timestamp").and_then(Value::as_f64) {
                newest = newest.max(ts);
            }
        }
        if newest > f64::MIN {
            metrics.written(newest, task_core::events::unix_now());
        }
        for c in &summary.completed {
            metrics.completed(&c.task, c.outcome);
        }
        tracing::debug!(
            events = events.len(),
            tasks = summary.tasks,
            workers = summary.workers,
            "batch written"
        );
    }
    status.consuming.store(false, Ordering::Relaxed);
    let _ = ch.close(200, "stopping".into()).await;
    let _ = connection.close(200, "stopping".into()).await;
    Ok(())
}

/// Writes a batch, retrying with back-off while the store fails; `None` if told to stop first.
async fn write_with_retry(
    store: &Store,
    events: &[Event],
    stop: &mut watch::Receiver<bool>,
) -> Option<crate::store::BatchSummary> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.write_batch(events).await {
            Ok(summary) => return Some(summary),
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "cannot write events; retrying in {backoff:?}");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
