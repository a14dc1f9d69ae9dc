//! Brokers: where task messages wait until a worker takes them.
//!
//! [`AmqpBroker`] speaks to RabbitMQ with Celery's topology; [`MemoryBroker`] keeps queues in the
//! process with the same semantics (acknowledgement, rejection, redelivery of unacknowledged messages,
//! prefetch), so most tests need no services. [`AnyBroker`] picks one from a URL at run time.
//!
//! Both deliver through the same [`Consumer`] and [`Delivery`] types: a delivery is acknowledged or
//! rejected exactly once, and one that is dropped without either is redelivered (as RabbitMQ does when
//! a channel closes with unacknowledged messages).

mod amqp;
mod amqp_settle;
mod delay;
pub mod field_table;
mod memory;
mod quorum;
mod tls;

pub use amqp::{AmqpBroker, Held, QosScope, QueueReader};
pub use memory::MemoryBroker;
pub use quorum::{QueueOptions, QueueType};
pub use tls::BrokerTls;

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::protocol::RawMessage;

/// The header carrying the reason a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-dead-letter-reason";
/// The header naming the queue a dead-lettered message came from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "x-original-queue";

/// The dead-letter queue of a task queue: `<queue>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// A message broker.
pub trait Broker: Clone + Send + Sync + 'static {
    /// Publishes a persistent message to `queue` (declaring it as Celery would if needed) and waits
    /// for the broker to confirm it.
    fn publish(&self, queue: &str, message: &RawMessage)
    -> impl Future<Output = Result<()>> + Send;

    /// Publishes a message that becomes available on `queue` after `delay`. The delay is kept by the
    /// broker, never by a consumer, so it survives restarts of every process.
    fn publish_delayed(
        &self,
        queue: &str,
        message: &RawMessage,
        delay: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Moves a message to `queue`'s dead-letter queue with a reason header.
    fn dead_letter(
        &self,
        queue: &str,
        message: &RawMessage,
        reason: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Starts consuming from `queues`, with at most `prefetch` unacknowledged deliveries at a time.
    fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> impl Future<Output = Result<Consumer>> + Send;

    /// Number of messages ready in `queue` (0 if it does not exist).
    fn queue_length(&self, queue: &str) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes `queue` and its messages.
    fn delete_queue(&self, queue: &str) -> impl Future<Output = Result<()>> + Send;
}

/// One message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: RawMessage,
    /// The queue it came from.
    pub queue: String,
    /// Whether the broker delivered it before (to a consumer that did not acknowledge it).
    pub redelivered: bool,
    acker: Acker,
}

#[derive(Debug)]
enum Acker {
    Amqp(amqp_settle::AmqpAcker),
    Memory(memory::MemoryAcker),
}

impl Delivery {
    /// Acknowledges the message: the broker forgets it.
    pub async fn ack(self) -> Result<()> {
        match self.acker {
            Acker::Amqp(a) => a.ack().await,
            Acker::Memory(a) => a.ack(),
        }
    }

    /// Rejects the message; with `requeue` it goes back to its queue for another consumer.
    pub async fn reject(self, requeue: bool) -> Result<()> {
        match self.acker {
            Acker::Amqp(a) => a.reject(requeue).await,
            Acker::Memory(a) => a.reject(requeue),
        }
    }
}

/// A stream of deliveries from one or more queues.
#[derive(Debug)]
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Consumer {
    fn new(
        capacity: usize,
        run: impl FnOnce(mpsc::Sender<Delivery>, watch::Receiver<bool>) -> tokio::task::JoinHandle<()>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let task = run(tx, stop_rx);
        Consumer {
            rx,
            stop,
            task: Some(task),
        }
    }

    /// The next delivery; `None` once the consumer is cancelled.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Stops consuming. Deliveries already handed over stay valid (ack them or reject them);
    /// prefetched ones not yet handed over are given back to the broker.
    pub async fn cancel(&mut self) {
        let _ = self.stop.send(true);
        // Closing first unblocks a consumer task waiting for room in the channel.
        self.rx.close();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        while let Some(d) = self.rx.recv().await {
            let _ = d.reject(true).await;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A broker chosen at run time from a URL: `amqp://…` or `memory://`.
#[derive(Clone, Debug)]
pub enum AnyBroker {
    /// RabbitMQ.
    Amqp(AmqpBroker),
    /// In-process queues.
    Memory(MemoryBroker),
}

impl AnyBroker {
    /// Connects to the broker a URL names. `memory://` gives a fresh in-process broker. RabbitMQ
    /// task queues are declared as the environment says ([`QueueOptions::from_env`]).
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(AnyBroker::Amqp(AmqpBroker::connect(url).await?))
        } else {
            Self::connect_with(url, QueueOptions::from_env()?).await
        }
    }

    /// Connects to the broker a URL names, declaring RabbitMQ task queues as `queues` says.
    pub async fn connect_with(url: &str, queues: QueueOptions) -> Result<Self> {
        if url.starts_with("memory://") {
            Ok(AnyBroker::Memory(MemoryBroker::new()))
        } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(AnyBroker::Amqp(
                AmqpBroker::connect(url).await?.with_queue_options(queues),
            ))
        } else {
            Err(Error::Config(format!(
                "BROKER_URL `{}` is not supported (use amqp://user:pass@host:port/vhost or memory://)",
                crate::redact_url(url)
            )))
        }
    }

    /// Publishes to a caller's reply queue (`reply_to`) without declaring it; `Ok(false)` when
    /// the queue is gone.
    pub async fn publish_reply(&self, reply_to: &str, message: &RawMessage) -> Result<bool> {
        match self {
            AnyBroker::Amqp(b) => b.publish_reply(reply_to, message).await,
            AnyBroker::Memory(b) => b.publish_reply(reply_to, message).await,
        }
    }

    /// Checks that the broker is reachable (always true for the in-memory broker).
    pub async fn ping(&self) -> Result<()> {
        match self {
            AnyBroker::Amqp(b) => b.ping().await,
            AnyBroker::Memory(_) => Ok(()),
        }
    }

    /// Closes connections (the in-memory broker has none).
    pub async fn close(&self) {
        if let AnyBroker::Amqp(b) = self {
            b.close().await;
        }
    }
}

impl From<MemoryBroker> for AnyBroker {
    fn from(b: MemoryBroker) -> Self {
        AnyBroker::Memory(b)
    }
}

impl From<AmqpBroker> for AnyBroker {
    fn from(b: AmqpBroker) -> Self {
        AnyBroker::Amqp(b)
    }
}

impl Broker for AnyBroker {
    async fn publish(&self, queue: &str, message: &RawMessage) -> Result<()> {
        match self {
            AnyBroker::Amqp(b) => b.publish(queue, message).await,
            AnyBroker::Memory(b) => b.publish(queue, message).await,
        }
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: &RawMessage,
        delay: Duration,
    ) -> Result<()> {
        match self {
            AnyBroker::Amqp(b) => b.publish_delayed(queue, message, delay).await,
            AnyBroker::Memory(b) => b.publish_delayed(queue, message, delay).await,
        }
    }

    async fn dead_letter(&self, queue: &str, message: &RawMessage, reason: &str) -> Result<()> {
        match self {
            AnyBroker::Amqp(b) => b.dead_letter(queue, message, reason).await,
            AnyBroker::Memory(b) => b.dead_letter(queue, message, reason).await,
        }
    }

    async fn consume(&self, queues: &[String], prefetch: u16) -> Result<Consumer> {
        match self {
            AnyBroker::Amqp(b) => b.consume(queues, prefetch).await,
            AnyBroker::Memory(b) => b.consume(queues, prefetch).await,
        }
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        match self {
            AnyBroker::Amqp(b) => b.queue_length(queue).await,
            AnyBroker::Memory(b) => b.queue_length(queue).await,
        }
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        match self {
            AnyBroker::Amqp(b) => b.delete_queue(queue).await,
            AnyBroker::Memory(b) => b.delete_queue(queue).await,
        }
    }
}

/// A message of dead-letter queue `dlq` as it is to be sent again: the queue it came from (its
/// [`DEAD_LETTER_QUEUE_HEADER`], else `dlq` without `.dlq`) and the message without the
/// dead-letter headers (ours and RabbitMQ's `x-death`).
pub fn restored_from_dead_letter(dlq: &str, message: &RawMessage) -> (String, RawMessage) {
    let queue = message
        .headers
        .get(DEAD_LETTER_QUEUE_HEADER)
        .and_then(|v| v.as_str())
        .filter(|q| !q.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| dlq.strip_suffix(".dlq").unwrap_or(dlq).to_owned());
    let mut m = message.clone();
    for h in [
        DEAD_LETTER_REASON_HEADER,
        DEAD_LETTER_QUEUE_HEADER,
        "x-dead-lettered-at",
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
    ] {
        m.headers.remove(h);
    }
    (queue, m)
}

/// Adds the dead-letter headers to a copy of `message`.
fn with_dead_letter_headers(message: &RawMessage, queue: &str, reason: &str) -> RawMessage {
    let mut m = message.clone();
    m.headers
        .insert(DEAD_LETTER_REASON_HEADER.into(), reason.into());
    m.headers
        .insert(DEAD_LETTER_QUEUE_HEADER.into(), queue.into());
    m.headers.insert(
        "x-dead-lettered-at".into(),
        crate::protocol::format_datetime(chrono::Utc::now()).into(),
    );
    m.properties.expiration = None;
    m
}
