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
//! - Prefetch is two batches: the next batch is read and decoded while one is written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};

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

/// What a committed batch changed, announced to live pages (`/live`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Update {
    /// Events written.
    pub events: usize,
    /// Task rows written.
    pub tasks: usize,
    /// Worker rows written.
    pub workers: usize,
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
    updates: broadcast::Sender<Update>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let result = session(&config, &store, &metrics, &status, &updates, &mut stop).await;
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
    updates: &broadcast::Sender<Update>,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let connection = broker::connect(&config.broker_url).await?;
    let ch = connection.create_channel().await?;
    config.queue.declare(&ch).await?;
    // Room for the batch being written and the one being read.
    ch.basic_qos(
        config.batch_size.max(1).saturating_mul(2),
        BasicQosOptions::default(),
    )
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
    // One batch is read and decoded while the one before it is written: the reader hands
    // batches to the writer through a channel of one.
    let (batches, mut to_write) = mpsc::channel::<Batch>(1);
    let mut reader_stop = stop.clone();
    let reader = async move {
        loop {
            let first = tokio::select! {
                _ = reader_stop.wait_for(|s| *s) => return Ok(()),
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
            // A batch ends at `max` events (a `task.multi` message carries many) or when
            // `batch_wait` has passed since its first message.
            let mut events: Vec<Event> = Vec::new();
            let decode = |delivery: &lapin::message::Delivery, events: &mut Vec<Event>| {
                match event::decode(&delivery.data) {
                    Ok(decoded) => events.extend(decoded),
                    Err(e) => {
                        status.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, routing_key = %delivery.routing_key, "dropping a message that is not an event");
                    }
                }
            };
            decode(&first, &mut events);
            let mut deliveries = vec![first];
            let deadline = tokio::time::Instant::now() + config.batch_wait;
            while events.len() < max && deliveries.len() < max {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(d)) => {
                        let d = d?;
                        decode(&d, &mut events);
                        deliveries.push(d);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let last = deliveries.pop().expect("a batch has a first delivery");
            if batches.send(Batch { events, last }).await.is_err() {
                // The writer stopped: what was not written stays unacknowledged.
                return Ok(());
            }
        }
    };
    let writer = async {
        while let Some(batch) = to_write.recv().await {
            let writing = std::time::Instant::now();
            let Some(summary) = write_with_retry(store, &batch.events, stop).await else {
                // Stopping with the batch unwritten: it stays unacknowledged and comes back.
                return Ok(());
            };
            batch
                .last
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
            record(status, metrics, &batch.events, &summary);
            // Nobody listening is fine: the pages then poll.
            let _ = updates.send(Update {
                events: batch.events.len(),
                tasks: summary.tasks,
                workers: summary.workers,
            });
            tracing::debug!(
                events = batch.events.len(),
                tasks = summary.tasks,
                workers = summary.workers,
                write_ms = writing.elapsed().as_secs_f64() * 1e3,
                "batch written"
            );
        }
        Ok::<(), Error>(())
    };
    let result = {
        let mut writer = std::pin::pin!(writer);
        let first = tokio::select! {
            r = reader => Err(r),
            w = &mut writer => Ok(w),
        };
        match first {
            Ok(written) => written,
            // The reader ends first when told to stop; the writer then finishes what it has.
            Err(Ok(())) => writer.await,
            Err(Err(e)) => Err(e),
        }
    };
    status.consuming.store(false, Ordering::Relaxed);
    let _ = ch.close(200, "stopping".into()).await;
    let _ = connection.close(200, "stopping".into()).await;
    result
}

/// Decoded events of consecutive deliveries, and the last delivery, whose multiple ack settles
/// them all.
struct Batch {
    events: Vec<Event>,
    last: lapin::message::Delivery,
}

/// Counts a committed batch in the status and the metrics.
fn record(
    status: &IntakeStatus,
    metrics: &Metrics,
    events: &[Event],
    summary: &crate::store::BatchSummary,
) {
    status.batches.fetch_add(1, Ordering::Relaxed);
    status
        .events
        .fetch_add(events.len() as u64, Ordering::Relaxed);
    let mut newest = f64::MIN;
    for e in events {
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
    metrics.observe(summary);
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
