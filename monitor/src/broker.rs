//! The monitor's own RabbitMQ connection: the durable events queue and queue statistics.
//!
//! task-core's `AmqpBroker` keeps its channels to itself, and the monitor needs two things it does
//! not offer: a queue declared with arguments (`x-max-length`, `x-message-ttl`) and the consumer
//! count of a queue. Both go through a `lapin::Connection` of the monitor's, reopened when lost.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use task_core::events::EVENT_EXCHANGE;

use crate::error::{Error, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the events queue is declared.
#[derive(Debug, Clone)]
pub struct EventsQueue {
    /// Queue name.
    pub name: String,
    /// `x-max-length`: the oldest events are dropped beyond it.
    pub max_length: u32,
    /// `x-message-ttl`.
    pub ttl: Duration,
    /// `x-expires`, if the queue should vanish after going unused.
    pub expires: Option<Duration>,
}

impl EventsQueue {
    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(self.max_length)),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)),
        );
        if let Some(expires) = self.expires {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        args
    }

    /// Declares the exchange (as Celery does: topic, durable), the queue and the `#` binding on
    /// `ch`. A queue that exists with other arguments is an error naming the setting to change.
    pub async fn declare(&self, ch: &Channel) -> Result<()> {
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
        let declared = ch
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.arguments(),
            )
            .await;
        match declared {
            Ok(_) => {}
            Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                return Err(Error::Config(format!(
                    "the events queue `{}` exists with other arguments than MONITOR_EVENTS_MAX_LENGTH, \
                     MONITOR_EVENTS_TTL and MONITOR_EVENTS_QUEUE_EXPIRES ask for ({e}); delete it \
                     (its unread events go with it) or set them to match",
                    self.name
                )));
            }
            Err(e) => return Err(e.into()),
        }
        ch.queue_bind(
            self.name.as_str().into(),
            EVENT_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }
}

fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// The `BROKER_TLS_*` files, read once: every reconnect uses the same.
fn broker_tls() -> Result<&'static task_core::broker::BrokerTls> {
    static TLS: std::sync::OnceLock<std::result::Result<task_core::broker::BrokerTls, String>> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| task_core::broker::BrokerTls::from_env().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Config(e.clone()))
}

/// Opens a connection named after the monitor.
pub async fn connect(url: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(
        format!("monitor {}@{}", std::process::id(), task_core::hostname()).into(),
    );
    let shown = task_core::redact_url(url);
    tokio::time::timeout(CONNECT_TIMEOUT, broker_tls()?.connect(url, props))
        .await
        .map_err(|_| Error::Unavailable(format!("timed out connecting to BROKER_URL {shown}")))?
        .map_err(|e| Error::Unavailable(format!("cannot connect to BROKER_URL {shown}: {e}")))
}

/// What the broker says about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueueStats {
    /// Messages ready for delivery.
    pub messages: u64,
    /// Consumers attached.
    pub consumers: u64,
    /// Messages delivered and not yet acknowledged (only the management API tells).
    pub unacked: Option<u64>,
    /// Seconds the head message has waited (only the management API tells, and only for a
    /// message with a `timestamp` property; 0 for an empty queue).
    pub oldest_age: Option<f64>,
    /// Messages a quorum queue holds while it dead-letters them at least once (only the
    /// management API tells; see [`crate::broker_api::ApiQueue::dead_lettering`]).
    pub dead_lettering: Option<u64>,
}

/// Reads queue statistics on a connection of its own, reconnecting when it was lost.
#[derive(Debug)]
pub struct QueueProbe {
    url: String,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

impl QueueProbe {
    /// A probe that connects on first use.
    pub fn new(url: impl Into<String>) -> Self {
        QueueProbe {
            url: url.into(),
            connection: tokio::sync::Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel> {
        let mut guard = self.connection.lock().await;
        if guard.as_ref().is_none_or(|c| !c.status().connected()) {
            *guard = Some(connect(&self.url).await?);
        }
        let connection = guard.as_ref().expect("just connected");
        Ok(connection.create_channel().await?)
    }

    /// The statistics of `queue`, `None` when it does not exist.
    pub async fn stats(&self, queue: &str) -> Result<Option<QueueStats>> {
        // A passive declare of a missing queue closes its channel: one channel per question.
        let ch = self.channel().await?;
        let declared = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => {
                let _ = ch.close(200, "ok".into()).await;
                Ok(Some(QueueStats {
                    messages: u64::from(q.message_count()),
                    consumers: u64::from(q.consumer_count()),
                    ..QueueStats::default()
                }))
            }
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Drops the ready messages of `queue`: how many.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        let ch = self.channel().await?;
        let n = ch.queue_purge(queue.into(), Default::default()).await?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(u64::from(n))
    }

    /// Deletes `queue` (tests clean up their events queues with it).
    pub async fn delete(&self, queue: &str) -> Result<()> {
        let ch = self.channel().await?;
        ch.queue_delete(queue.into(), Default::default()).await?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }
}
