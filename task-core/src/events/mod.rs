//! Celery events: what a worker (and optionally a client) tells monitors about itself and its
//! tasks, on the `celeryev` topic exchange, exactly as Celery's `EventDispatcher` sends them
//! (reference `celery-protocol.md` §4.1–4.3), so Flower, `celery events` and our monitor read them.
//!
//! Invariants:
//! - **Events never slow tasks down.** [`Events::send`] only puts the event on a bounded in-memory
//!   queue; a background publisher sends it transient (delivery mode 1), unconfirmed, on a channel
//!   of its own. Task events are sent as Celery's worker sends them, in batches (a JSON list under
//!   routing key `task.multi`, up to 200 events or 100 ms); worker events singly. When the queue is full or the broker is away the event is dropped and counted
//!   ([`Events::dropped`]): events are a view, never a record the system depends on.
//! - **Every event carries the common fields** `type`, `hostname`, `timestamp` (float Unix
//!   seconds, UTC), `utcoffset` (0), `pid` and a Lamport `clock` shared with remote control.
//! - **Task events follow the switch.** `task-*` events are sent only while task events are on
//!   (worker flag, or the `enable_events`/`disable_events` control commands); worker events
//!   (online, heartbeat, offline) always are.

pub mod repr;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::broker::AmqpBroker;
use crate::broker::field_table::{json_to_table, short};

/// The events exchange.
pub const EVENT_EXCHANGE: &str = "celeryev";
/// How often a worker sends `worker-heartbeat` (Celery's default `freq`).
pub const HEARTBEAT_FREQ: Duration = Duration::from_secs(2);
/// Events waiting to be published before new ones are dropped.
const QUEUE_CAPACITY: usize = 10_000;

/// A Lamport clock, shared by events and remote control as in Celery's `app.clock`.
#[derive(Debug, Default)]
pub struct LamportClock(AtomicU64);

impl LamportClock {
    /// Ticks for a local event and returns the new value.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Moves past a value seen in a message from elsewhere.
    pub fn adjust(&self, other: u64) -> u64 {
        let mut current = self.0.load(Ordering::SeqCst);
        loop {
            let next = current.max(other) + 1;
            match self
                .0
                .compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(seen) => current = seen,
            }
        }
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where events go.
#[derive(Debug, Clone)]
pub enum EventSink {
    /// The `celeryev` exchange on RabbitMQ.
    Amqp(AmqpBroker),
    /// An in-process channel (tests, the in-memory broker).
    Memory(broadcast::Sender<Value>),
    /// Nowhere.
    Disabled,
}

impl EventSink {
    /// The sink that matches a broker: RabbitMQ's exchange, or nothing for the in-memory broker.
    pub fn for_broker(broker: &crate::AnyBroker) -> Self {
        match broker {
            crate::AnyBroker::Amqp(b) => EventSink::Amqp(b.clone()),
            crate::AnyBroker::Memory(_) => EventSink::Disabled,
        }
    }
}

/// An event dispatcher. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hostname: String,
    pid: u32,
    clock: Arc<LamportClock>,
    task_events: AtomicBool,
    tx: Option<mpsc::Sender<Value>>,
    /// Task events waiting for the next `task.multi` publish (AMQP only). Filled without waking
    /// the publisher, which takes the whole buffer every [`BATCH_WINDOW`] or when it is full.
    batch: Option<Arc<Batch>>,
    published: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    publisher: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Batch {
    events: std::sync::Mutex<Vec<Value>>,
    full: tokio::sync::Notify,
}

impl Events {
    /// A dispatcher sending as node `hostname` to `sink`, with task events on or off. Starts the
    /// background publisher (call inside a tokio runtime).
    pub fn start(sink: EventSink, hostname: impl Into<String>, task_events: bool) -> Self {
        Self::with_clock(sink, hostname, task_events, Arc::default())
    }

    /// Like [`Events::start`], sharing a clock with remote control.
    pub fn with_clock(
        sink: EventSink,
        hostname: impl Into<String>,
        task_events: bool,
        clock: Arc<LamportClock>,
    ) -> Self {
        let published = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let batch = matches!(sink, EventSink::Amqp(_)).then(|| Arc::new(Batch::default()));
        let (tx, publisher) = match sink {
            EventSink::Disabled => (None, None),
            sink => {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                let task = tokio::spawn(publish_loop(
                    sink,
                    clock.clone(),
                    rx,
                    batch.clone(),
                    published.clone(),
                    dropped.clone(),
                ));
                (Some(tx), Some(task))
            }
        };
        Events {
            inner: Arc::new(Inner {
                hostname: hostname.into(),
                pid: std::process::id(),
                clock,
                task_events: AtomicBool::new(task_events),
                tx,
                batch,
                published,
                dropped,
                publisher: std::sync::Mutex::new(publisher),
            }),
        }
    }

    /// A dispatcher that sends nothing.
    pub fn disabled(hostname: impl Into<String>) -> Self {
        Self::start(EventSink::Disabled, hostname, false)
    }

    /// The node name events are sent as.
    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }

    /// The Lamport clock.
    pub fn clock(&self) -> &Arc<LamportClock> {
        &self.inner.clock
    }

    /// Whether `task-*` events are being sent.
    pub fn task_events(&self) -> bool {
        self.inner.task_events.load(Ordering::Relaxed)
    }

    /// Turns `task-*` events on or off.
    pub fn set_task_events(&self, on: bool) {
        self.inner.task_events.store(on, Ordering::Relaxed);
    }

    /// Events handed to the broker so far.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Events dropped (queue full, broker unreachable, publish failed).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Sends an event of `kind` (`worker-heartbeat`, `task-succeeded`, …) with `fields` plus the
    /// common fields. Never waits.
    pub fn send(&self, kind: &str, fields: Map<String, Value>) {
        let Some(tx) = &self.inner.tx else { return };
        let mut event = fields;
        event.insert("type".into(), kind.into());
        event.insert("hostname".into(), self.inner.hostname.clone().into());
        event.insert("timestamp".into(), json!(unix_now()));
        event.insert("utcoffset".into(), json!(0));
        event.insert("pid".into(), json!(self.inner.pid));
        // The `clock` is stamped by the publisher as it sends, so the events of one node leave
        // in clock order even when tasks on several threads send at once.
        // `task-sent` comes from clients, one per publish: sent at once, so a monitor sees the
        // task before a worker reports on it. Worker events too go at once (after the batch).
        if let Some(batch) = &self.inner.batch
            && kind.starts_with("task-")
            && kind != "task-sent"
        {
            let mut events = batch.events.lock().expect("events batch lock");
            if events.len() >= QUEUE_CAPACITY {
                drop(events);
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            events.push(Value::Object(event));
            if events.len() == BATCH_MAX {
                batch.full.notify_one();
            }
            return;
        }
        if tx.try_send(Value::Object(event)).is_err() {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends a `task-*` event if task events are on.
    pub fn task(&self, kind: &str, uuid: &str, mut fields: Map<String, Value>) {
        if !self.task_events() {
            return;
        }
        fields.insert("uuid".into(), uuid.into());
        self.send(kind, fields);
    }

    /// Stops accepting events and waits (up to `timeout`) until the queued ones are published.
    pub async fn close(&self, timeout: Duration) {
        let task = self.inner.publisher.lock().expect("events lock").take();
        if let Some(task) = task {
            // The loop ends once every sender is gone; ours is the last one that matters, so it
            // is told to finish by a marker rather than by dropping (clones may outlive this).
            if let Some(tx) = &self.inner.tx {
                let _ = tx.send(Value::Null).await;
            }
            let _ = tokio::time::timeout(timeout, task).await;
        }
    }
}

/// Seconds since the Unix epoch, as a float.
pub fn unix_now() -> f64 {
    let now = chrono::Utc::now();
    now.timestamp() as f64 + f64::from(now.timestamp_subsec_micros()) / 1e6
}

/// The fields every worker event carries (reference §4.2).
pub fn worker_fields(active: usize, processed: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("freq".into(), json!(HEARTBEAT_FREQ.as_secs_f64()));
    m.insert("active".into(), json!(active));
    m.insert("processed".into(), json!(processed));
    m.insert("loadavg".into(), json!(loadavg()));
    m.insert("sw_ident".into(), json!(SW_IDENT));
    m.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
    m.insert("sw_sys".into(), json!(sw_sys()));
    m
}

/// What this software calls itself in `sw_ident` (Celery sends `py-celery`).
pub const SW_IDENT: &str = "rs-task-core";

fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages (zeros where the system does not say).
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|s| (s.parse::<f64>().unwrap_or(0.0) * 100.0).round() / 100.0);
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// The routing key of an event: its type with `-` turned into `.`.
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// Task events waiting for one publish as a `task.multi` list, at most this many…
const BATCH_MAX: usize = 200;
/// …and for at most this long after the first of them.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

async fn publish_loop(
    sink: EventSink,
    clock: Arc<LamportClock>,
    mut rx: mpsc::Receiver<Value>,
    batch: Option<Arc<Batch>>,
    published: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
) {
    let mut out = Publisher {
        sink,
        clock,
        channel: None,
        retry_at: tokio::time::Instant::now(),
        published,
        dropped,
    };
    // Task events are batched as Celery's own worker batches them (a JSON list under routing key
    // `task.multi`, which Celery's receiver, Flower and our monitor all read): one publish, and
    // one wake-up of this loop, per event would cost the worker a third of its throughput.
    let take = |batch: &Option<Arc<Batch>>| -> Vec<Value> {
        batch
            .as_ref()
            .map(|b| std::mem::take(&mut *b.events.lock().expect("events batch lock")))
            .unwrap_or_default()
    };
    let mut tick = tokio::time::interval(BATCH_WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A fresh wait each round: `notify_one` keeps a permit when nobody waits, so a batch
        // that filled up meanwhile is not missed.
        let full = async {
            match &batch {
                Some(b) => b.full.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = rx.recv() => match event {
                None | Some(Value::Null) => break,
                Some(event) => {
                    out.send_batch(take(&batch)).await;
                    out.send(event, 1).await;
                }
            },
            _ = full => out.send_batch(take(&batch)).await,
            _ = tick.tick() => out.send_batch(take(&batch)).await,
        }
    }
    out.send_batch(take(&batch)).await;
    if let Some((ch, _)) = out.channel {
        let _ = ch.close(200, "events done".into()).await;
    }
}

/// The sending end of the publish loop.
struct Publisher {
    sink: EventSink,
    clock: Arc<LamportClock>,
    channel: Option<(lapin::Channel, u64)>,
    retry_at: tokio::time::Instant,
    published: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl Publisher {
    async fn send_batch(&mut self, mut batch: Vec<Value>) {
        match batch.len() {
            0 => {}
            1 => {
                let event = batch.pop().unwrap_or(Value::Null);
                self.send(event, 1).await;
            }
            n => self.send(Value::Array(batch), n as u64).await,
        }
    }

    /// Publishes one event, or a list of `n` task events, each stamped with the next clock value.
    async fn send(&mut self, mut event: Value, n: u64) {
        let mut stamp = |e: &mut Value| {
            if let Value::Object(fields) = e {
                fields.insert("clock".into(), json!(self.clock.forward()));
            }
        };
        match &mut event {
            Value::Array(list) => list.iter_mut().for_each(&mut stamp),
            single => stamp(single),
        }
        match &self.sink {
            EventSink::Disabled => {}
            EventSink::Memory(tx) => {
                if tx.send(event).is_ok() {
                    self.published.fetch_add(n, Ordering::Relaxed);
                } else {
                    self.dropped.fetch_add(n, Ordering::Relaxed);
                }
            }
            EventSink::Amqp(broker) => {
                if self
                    .channel
                    .as_ref()
                    .is_some_and(|(c, _)| !c.status().connected())
                {
                    self.channel = None;
                }
                if self.channel.is_none() && tokio::time::Instant::now() >= self.retry_at {
                    match open_event_channel(broker).await {
                        Ok(c) => self.channel = Some(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot open the events channel");
                            self.retry_at = tokio::time::Instant::now() + Duration::from_secs(1);
                        }
                    }
                }
                let Some((ch, _)) = &self.channel else {
                    self.dropped.fetch_add(n, Ordering::Relaxed);
                    return;
                };
                match publish_event(ch, &event).await {
                    Ok(()) => {
                        self.published.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "could not publish an event");
                        self.dropped.fetch_add(n, Ordering::Relaxed);
                        self.channel = None;
                    }
                }
            }
        }
    }
}

async fn open_event_channel(broker: &AmqpBroker) -> crate::Result<(lapin::Channel, u64)> {
    let (ch, generation) = broker.open_channel().await?;
    ch.exchange_declare(
        EVENT_EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok((ch, generation))
}

async fn publish_event(ch: &lapin::Channel, event: &Value) -> crate::Result<()> {
    let first = match event {
        Value::Array(list) => list.first().unwrap_or(&Value::Null),
        single => single,
    };
    let kind = if event.is_array() {
        "task-multi"
    } else {
        first.get("type").and_then(Value::as_str).unwrap_or("")
    };
    let hostname = first.get("hostname").cloned().unwrap_or(Value::Null);
    let mut headers = Map::new();
    headers.insert("hostname".into(), hostname);
    let body = serde_json::to_vec(event)?;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(1)
        .with_headers(json_to_table(&headers)?);
    // Not a confirm channel: the confirmation resolves at once, as `NotRequested`.
    ch.basic_publish(
        EVENT_EXCHANGE.into(),
        short(&routing_key(kind))?,
        BasicPublishOptions::default(),
        &body,
        props,
    )
    .await?
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_past_what_it_sees() {
        let c = LamportClock::default();
        assert_eq!(c.forward(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.adjust(3), 12);
    }

    #[tokio::test]
    async fn events_carry_the_common_fields_and_follow_the_switch() {
        let (tx, mut rx) = broadcast::channel(16);
        let events = Events::start(EventSink::Memory(tx), "w1@test", false);
        events.task("task-started", "id-1", Map::new());
        events.send("worker-online", worker_fields(0, 0));
        let online = rx.recv().await.unwrap();
        assert_eq!(online["type"], "worker-online");
        assert_eq!(online["hostname"], "w1@test");
        assert_eq!(online["sw_ident"], SW_IDENT);
        assert_eq!(online["freq"], 2.0);
        for field in ["timestamp", "utcoffset", "pid", "clock", "loadavg"] {
            assert!(online.get(field).is_some(), "{field} missing");
        }
        events.set_task_events(true);
        events.task("task-started", "id-2", Map::new());
        let started = rx.recv().await.unwrap();
        assert_eq!(started["type"], "task-started");
        assert_eq!(started["uuid"], "id-2");
        assert!(started["clock"].as_u64() > online["clock"].as_u64());
        events.close(Duration::from_secs(1)).await;
        assert_eq!(events.published(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_sent_from_many_threads_leave_in_clock_order() {
        let (tx, mut rx) = broadcast::channel(4096);
        let events = Events::start(EventSink::Memory(tx), "w1@test", true);
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let events = events.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        events.task("task-started", &format!("{t}-{i}"), Map::new());
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        events.close(Duration::from_secs(5)).await;
        let mut last = 0;
        for _ in 0..1000 {
            let clock = rx.recv().await.unwrap()["clock"].as_u64().unwrap();
            assert!(clock > last, "clock {clock} after {last}");
            last = clock;
        }
    }
}
