//! RabbitMQ broker on lapin, with Celery's topology and our own reconnection.
//!
//! Topology: each task queue is durable, bound to a durable direct exchange of the same name (what
//! Celery declares), and messages are published through the default exchange with the queue name
//! as routing key. Queues are classic, or quorum as the environment says ([`super::QueueOptions`]).
//! A queue that already exists with other arguments is used as it is rather than redeclared (a
//! mismatched declaration would close the channel with 406).
//!
//! Several brokers: `BROKER_URL` may list nodes of one cluster separated by `;` (Celery's form) or
//! `,`. A connection goes to the first node that answers, starting from the one last connected to,
//! so after a node is lost publishers and consumers move to the next one.
//!
//! Every publish is persistent, `mandatory`, and waits for its publisher confirm; an unroutable or
//! nacked message is an error, never a silent loss.
//!
//! Connections: a broker handle opens two, one for publishing (a confirm-mode channel for messages,
//! plus the channels of events, remote control and declarations) and one for consuming (one channel
//! per consumer, which also carries its acknowledgements). They never share a connection, as
//! RabbitMQ advises: a publisher throttled by a resource alarm (`connection.blocked`) must not stop
//! acknowledgements, and nothing that happens to a publish may reset a consumer, whose unacknowledged
//! deliveries would all come back.
//!
//! Refusals: when RabbitMQ closes the publishing channel over one message (406 for a message above
//! `max_message_size` or an invalid property, 404 for a missing exchange, 403 for a forbidden one),
//! only that channel is replaced. Such a refusal from a healthy broker is not retried through
//! reconnects: the caller gets [`Error::Refused`] naming the operation and the broker's reply at
//! once. A channel error also fails every other publish waiting for its confirm on that channel, so
//! a publish refused on the shared channel is tried once more, at once, on a channel of its own:
//! the innocent ones go through, and a second refusal is certainly the message's own and hurts no
//! other publish.
//!
//! Reconnection: when a connection fails, the next operation on it opens a new one; publishes retry
//! with capped exponential back-off for up to [`AmqpBroker::with_retry_for`] (60 s by default). Each
//! consumer runs a loop that re-opens its channel, re-applies QoS, re-declares and re-consumes after
//! any failure, so a broker restart pauses a worker instead of stopping it. Deliveries taken before a
//! reconnect cannot be acknowledged afterwards; the broker redelivers them (at least once).
//!
//! QoS: by default the prefetch window is shared by every consumer of a channel (`basic.qos` with
//! `global`, Celery's choice on RabbitMQ). Quorum queues do not support a channel-wide window
//! (RabbitMQ closes the connection with 540), so a consumer of one queue, or of queues declared
//! quorum, uses a per-consumer window (the same thing for one queue), and a broker that is refused
//! one anyway switches to per-consumer windows. [`AmqpBroker::with_qos`] with
//! [`QosScope::PerConsumer`] chooses them outright.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::OnceCell;

use super::amqp_settle::Settler;
use super::delay::{self, DELIVER_EXCHANGE, LEVELS};
use super::field_table::{json_to_table, short, table_to_json};
use super::quorum::{self, QueueOptions, QueueType};
use super::{
    Acker, Broker, BrokerTls, Consumer, Delivery, dead_letter_queue, with_dead_letter_headers,
};
use crate::error::{Error, Result};
use crate::protocol::{Properties, RawMessage};

mod reader;
pub use reader::{Held, QueueReader};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A RabbitMQ broker. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
    retry_for: Duration,
    qos: QosScope,
    queues: Arc<QueueOptions>,
}

/// What a consumer's prefetch window covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QosScope {
    /// One window for every queue consumed on the channel (`basic.qos` with `global`), as Celery
    /// sets it on RabbitMQ. Classic queues only.
    #[default]
    Channel,
    /// A window per queue consumer (`global` off): what quorum queues require. With several queues
    /// a consumer may hold up to the prefetch count from each.
    PerConsumer,
}

/// What a connection is used for (see the module docs for why they are apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Publish,
    Consume,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Consume => "consume",
        }
    }
}

struct Inner {
    /// The nodes to connect to, in order, and their redacted forms.
    uris: Vec<String>,
    displays: Vec<String>,
    /// All of them redacted, `;`-separated.
    display: String,
    /// The node the last connection went to: the next connection tries it first.
    current: AtomicUsize,
    /// Set once RabbitMQ refused a channel-wide prefetch window (a quorum queue not declared as
    /// one here): consumers use per-consumer windows from then on.
    per_consumer_forced: AtomicBool,
    publish: tokio::sync::Mutex<Option<Arc<Link>>>,
    consume: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Connections opened, per role.
    publish_generations: AtomicU64,
    consume_generations: AtomicU64,
    closed: AtomicBool,
    /// Settling tasks of consumer channels, awaited on close so their last acks go out.
    settlers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What `amqps://` connections trust and present.
    tls: BrokerTls,
}

impl Inner {
    fn slot(&self, role: Role) -> &tokio::sync::Mutex<Option<Arc<Link>>> {
        match role {
            Role::Publish => &self.publish,
            Role::Consume => &self.consume,
        }
    }

    fn generations(&self, role: Role) -> &AtomicU64 {
        match role {
            Role::Publish => &self.publish_generations,
            Role::Consume => &self.consume_generations,
        }
    }
}

/// One live connection and what has been set up on it.
struct Link {
    generation: u64,
    connection: Connection,
    /// The confirm-mode channel messages are published on (publish connection only), replaced
    /// when the broker closes it.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    declared: Mutex<HashSet<String>>,
    delay_topology: OnceCell<()>,
    /// Celery's delay levels, declared (or found wanting) once per connection.
    celery_delayed: OnceCell<bool>,
}

impl Link {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
    }

    /// The publishing channel, opening a new one (in confirm mode) if the last one was closed.
    async fn publisher(&self) -> Result<Channel> {
        let mut current = self.publisher.lock().await;
        if let Some(ch) = current.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.connection.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *current = Some(ch.clone());
        Ok(ch)
    }
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.inner.display)
            .finish()
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

fn hard_error(e: &lapin::Error) -> Option<AMQPHardError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Hard(h) => Some(h.clone()),
            AMQPErrorKind::Soft(_) => None,
        },
        _ => None,
    }
}

/// A channel error the broker answered `what` with becomes [`Error::Refused`]; anything else (a
/// lost connection, a closed channel) stays a plain broker error, which is retried.
fn refusal(what: impl FnOnce() -> String) -> impl FnOnce(lapin::Error) -> Error {
    move |e| match e.kind() {
        lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(_)) => {
            Error::Refused {
                what: what(),
                code: p.get_id(),
                text: p.get_message().to_string(),
            }
        }
        _ => e.into(),
    }
}

async fn publisher_open(link: &Link) -> bool {
    link.publisher
        .lock()
        .await
        .as_ref()
        .is_some_and(|ch| ch.status().connected())
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

impl AmqpBroker {
    /// Connects now, so a wrong URL or an unreachable broker is reported at start-up. `uri` is one
    /// URL or several nodes' separated by `;` or `,`. Task queues are declared as the environment
    /// says ([`QueueOptions::from_env`]).
    pub async fn connect(uri: &str) -> Result<Self> {
        Self::connect_with_tls(uri, BrokerTls::from_env()?).await
    }

    /// [`connect`](Self::connect) with `amqps://` connections trusting and presenting what `tls`
    /// says instead of what the environment does.
    pub async fn connect_with_tls(uri: &str, tls: BrokerTls) -> Result<Self> {
        let uris: Vec<String> = uri
            .split([';', ','])
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if uris.is_empty() {
            return Err(Error::Config("BROKER_URL names no broker".into()));
        }
        if let Some(bad) = uris
            .iter()
            .find(|u| !u.starts_with("amqp://") && !u.starts_with("amqps://"))
        {
            return Err(Error::Config(format!(
                "BROKER_URL: `{}` in the list is not an amqp:// URL",
                crate::redact_url(bad)
            )));
        }
        let displays: Vec<String> = uris.iter().map(|u| crate::redact_url(u)).collect();
        let uris = uris
            .into_iter()
            .map(|u| with_default_frame_max(&u))
            .collect();
        let broker = AmqpBroker {
            inner: Arc::new(Inner {
                display: displays.join(";"),
                uris,
                displays,
                current: AtomicUsize::new(0),
                per_consumer_forced: AtomicBool::new(false),
                publish: tokio::sync::Mutex::new(None),
                consume: tokio::sync::Mutex::new(None),
                publish_generations: AtomicU64::new(0),
                consume_generations: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                settlers: Mutex::new(Vec::new()),
                tls,
            }),
            retry_for: Duration::from_secs(60),
            qos: QosScope::default(),
            queues: Arc::new(QueueOptions::from_env()?),
        };
        // The consume connection opens with the first consumer: a client never needs it.
        broker.link(Role::Publish).await?;
        Ok(broker)
    }

    /// Sets what a consumer's prefetch window covers (for consumers started afterwards).
    pub fn with_qos(mut self, qos: QosScope) -> Self {
        self.qos = qos;
        self
    }

    /// Sets how task queues are declared (instead of what the environment says).
    pub fn with_queue_options(mut self, options: QueueOptions) -> Self {
        self.queues = Arc::new(options);
        self
    }

    /// How task queues are declared.
    pub fn queue_options(&self) -> &QueueOptions {
        &self.queues
    }

    /// Checks that the broker is reachable now (reconnecting if the connection was lost).
    pub async fn ping(&self) -> Result<()> {
        let link = self.link(Role::Publish).await?;
        if link.healthy() {
            Ok(())
        } else {
            Err(Error::Broker(format!(
                "{} is not connected",
                self.inner.display
            )))
        }
    }

    /// The broker URL with its password masked.
    pub fn display_url(&self) -> &str {
        &self.inner.display
    }

    /// How many times a connection (publishing or consuming) was re-established after its first.
    pub fn reconnects(&self) -> u64 {
        [Role::Publish, Role::Consume]
            .into_iter()
            .map(|r| {
                self.inner
                    .generations(r)
                    .load(Ordering::SeqCst)
                    .saturating_sub(1)
            })
            .sum()
    }

    /// A new channel on the publishing connection (reconnecting first if it is down), for the
    /// worker's own traffic beside tasks: events and remote control. The second value is the
    /// connection's generation, so a caller can tell when its channel belongs to a lost link.
    pub(crate) async fn open_channel(&self) -> Result<(Channel, u64)> {
        let link = self.link(Role::Publish).await?;
        let channel = link.connection.create_channel().await?;
        Ok((channel, link.generation))
    }

    /// How long a publish keeps retrying through reconnects before it fails.
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// Closes the connection, after giving settled deliveries' acknowledgements a moment to go out.
    /// Unacknowledged deliveries go back to their queues.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let settlers = std::mem::take(&mut *self.inner.settlers.lock().expect("settlers lock"));
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            futures_util::future::join_all(settlers),
        )
        .await;
        for role in [Role::Consume, Role::Publish] {
            if let Some(link) = self.inner.slot(role).lock().await.take() {
                // A broker that does not answer must not keep the process from exiting.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    link.connection.close(200, "closing".into()),
                )
                .await;
            }
        }
    }

    async fn open_link(&self, role: Role) -> Result<Arc<Link>> {
        let props = ConnectionProperties::default().with_connection_name(
            // `task-core <pid>@<host>` first: operators (and tests) find a process's
            // connections by that prefix.
            format!(
                "task-core {}@{} ({})",
                std::process::id(),
                crate::hostname(),
                role.name()
            )
            .into(),
        );
        let connection = self.connect_any(props).await?;
        let publisher = match role {
            Role::Publish => {
                let ch = connection.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Some(ch)
            }
            Role::Consume => None,
        };
        let generation = self.inner.generations(role).fetch_add(1, Ordering::SeqCst) + 1;
        if generation > 1 {
            tracing::info!(broker = %self.inner.display, connection = role.name(), generation, "reconnected to RabbitMQ");
        }
        Ok(Arc::new(Link {
            generation,
            connection,
            publisher: tokio::sync::Mutex::new(publisher),
            declared: Mutex::new(HashSet::new()),
            delay_topology: OnceCell::new(),
            celery_delayed: OnceCell::new(),
        }))
    }

    /// A connection to the first node that answers, starting from the last one connected to.
    async fn connect_any(&self, props: ConnectionProperties) -> Result<Connection> {
        let n = self.inner.uris.len();
        let start = self.inner.current.load(Ordering::SeqCst) % n;
        let mut errors = Vec::new();
        for i in (0..n).map(|k| (start + k) % n) {
            let node = &self.inner.displays[i];
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                self.inner.tls.connect(&self.inner.uris[i], props.clone()),
            )
            .await;
            match attempt {
                Ok(Ok(connection)) => {
                    if i != start {
                        tracing::warn!(broker = %node, "connected to another node of the cluster");
                    }
                    self.inner.current.store(i, Ordering::SeqCst);
                    return Ok(connection);
                }
                Ok(Err(e)) => errors.push(format!("cannot connect to {node}: {e}")),
                Err(_) => errors.push(format!("timed out connecting to {node}")),
            }
        }
        Err(Error::Broker(errors.join("; ")))
    }

    /// The current healthy connection for `role`, opening a new one if needed.
    async fn link(&self, role: Role) -> Result<Arc<Link>> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Shutdown);
        }
        let mut current = self.inner.slot(role).lock().await;
        if let Some(link) = current.as_ref()
            && link.healthy()
        {
            return Ok(link.clone());
        }
        if let Some(old) = current.take() {
            tracing::warn!(broker = %self.inner.display, connection = role.name(), generation = old.generation, "RabbitMQ connection lost");
            let _ = old.connection.close(200, "replaced".into()).await;
        }
        let link = self.open_link(role).await?;
        *current = Some(link.clone());
        Ok(link)
    }

    /// Runs `op` on a healthy publishing connection, reconnecting and retrying while the failure
    /// is the connection's or a channel's, for up to `retry_for`. A refusal by a healthy broker
    /// is returned at once.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Arc<Link>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            let error = match self.link(Role::Publish).await {
                Ok(link) => match op(link.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e @ Error::Refused { .. }) if link.healthy() => return Err(e),
                    Err(e @ Error::NotConfirmed { .. }) if link.healthy() => {
                        link.declared.lock().expect("declared lock").clear();
                        e
                    }
                    // The publishing channel closed under this publish (another publish's
                    // refusal): the next attempt opens a new one.
                    Err(e) if link.healthy() && !publisher_open(&link).await => e,
                    Err(e) if link.healthy() => return Err(e),
                    Err(e) => e,
                },
                Err(Error::Shutdown) => return Err(Error::Shutdown),
                Err(e) => e,
            };
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(error);
            }
            tracing::warn!(broker = %self.inner.display, %error, "{what} failed; retrying in {backoff:?}");
            tokio::time::sleep(backoff + Duration::from_millis(fastrand::u64(0..100))).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Declares `queue` as Celery does (plus its binding for delayed delivery), once per connection.
    async fn ensure_task_queue(&self, link: &Link, queue: &str) -> Result<()> {
        if link.declared.lock().expect("declared lock").contains(queue) {
            return Ok(());
        }
        let name = short(queue)?;
        let mut ch = link.connection.create_channel().await?;
        let args = self.queues.declare_args(self.queues.queue_type(queue));
        match ch.queue_declare(name.clone(), durable_queue(), args).await {
            Ok(_) => {}
            Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                tracing::warn!(
                    queue,
                    "queue exists with other arguments; using it as it is"
                );
                ch = link.connection.create_channel().await?;
            }
            Err(e) => return Err(refusal(|| format!("declaring queue `{queue}`"))(e)),
        }
        // Celery's quorum set-up wants topic exchanges (its native delayed delivery skips direct
        // ones); the queue's own binding is an exact key, which matches alike in both.
        let kind = match self.queues.queue_type(queue) {
            QueueType::Classic => ExchangeKind::Direct,
            QueueType::Quorum => ExchangeKind::Topic,
        };
        match ch
            .exchange_declare(
                name.clone(),
                kind,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                ch.queue_bind(
                    name.clone(),
                    name.clone(),
                    name.clone(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(refusal(|| format!("binding queue `{queue}`")))?;
            }
            Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                tracing::warn!(
                    queue,
                    "exchange `{queue}` exists with another type; not binding"
                );
                ch = link.connection.create_channel().await?;
            }
            Err(e) => return Err(refusal(|| format!("declaring exchange `{queue}`"))(e)),
        }
        let pattern = delay::delivery_pattern(queue);
        if pattern.len() <= 255 {
            ch.exchange_declare(
                DELIVER_EXCHANGE.into(),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
            ch.queue_bind(
                name,
                DELIVER_EXCHANGE.into(),
                short(&pattern)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refusal(|| {
                format!("binding queue `{queue}` for delayed delivery")
            }))?;
        }
        let _ = ch.close(200, "declared".into()).await;
        link.declared
            .lock()
            .expect("declared lock")
            .insert(queue.to_owned());
        Ok(())
    }

    /// Declares a durable queue without bindings (dead-letter queues, of the type of the queue
    /// they serve), once per connection.
    async fn ensure_plain_queue(&self, link: &Link, queue: &str, kind: QueueType) -> Result<()> {
        if link.declared.lock().expect("declared lock").contains(queue) {
            return Ok(());
        }
        let ch = link.connection.create_channel().await?;
        match ch
            .queue_declare(
                short(queue)?,
                durable_queue(),
                self.queues.declare_args(kind),
            )
            .await
        {
            Ok(_) => {
                let _ = ch.close(200, "declared".into()).await;
            }
            Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {}
            Err(e) => return Err(refusal(|| format!("declaring queue `{queue}`"))(e)),
        }
        link.declared
            .lock()
            .expect("declared lock")
            .insert(queue.to_owned());
        Ok(())
    }

    /// Makes Celery's native delayed delivery reach quorum queue `queue` (see [`super::quorum`]):
    /// declares kombu's delay levels once per connection, then binds the queue. Best effort: a
    /// failure is logged, and only Python countdowns to this queue wait for a Python worker.
    async fn bind_celery_delayed(&self, link: &Link, queue: &str) {
        let declared = link
            .celery_delayed
            .get_or_init(|| async {
                let result = async {
                    let ch = link.connection.create_channel().await?;
                    quorum::declare_celery_delayed(&ch).await?;
                    let _ = ch.close(200, "declared".into()).await;
                    Ok::<(), Error>(())
                }
                .await;
                match result {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, "cannot declare Celery's delay levels (celery_delayed_*)");
                        false
                    }
                }
            })
            .await;
        if !*declared {
            return;
        }
        let result = async {
            let ch = link.connection.create_channel().await?;
            ch.queue_bind(
                short(queue)?,
                short(quorum::CELERY_DELIVERY_EXCHANGE)?,
                short(&quorum::celery_delivery_pattern(queue))?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let _ = ch.close(200, "bound".into()).await;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(queue, %error, "cannot bind the queue for Celery's delayed delivery");
        }
    }

    /// Declares the delay levels (see [`super::delay`]), once per connection.
    async fn ensure_delay_topology(&self, link: &Link) -> Result<()> {
        link.delay_topology
            .get_or_try_init(|| async {
                let ch = link.connection.create_channel().await?;
                let topic = |name: String| {
                    let ch = ch.clone();
                    async move {
                        ch.exchange_declare(
                            short(&name)?,
                            ExchangeKind::Topic,
                            durable_exchange(),
                            FieldTable::default(),
                        )
                        .await
                        .map_err(Error::from)
                    }
                };
                topic(DELIVER_EXCHANGE.to_owned()).await?;
                // A quorum queue like the levels: at-least-once dead-lettering waits for every
                // target queue's confirm, so a classic sink on one node of a cluster stalls every
                // level's deliveries while that node is down. On a channel of its own, because a
                // sink declared classic by an older version refuses this declaration.
                let mut sink = FieldTable::default();
                sink.insert("x-message-ttl".into(), AMQPValue::LongLongInt(0));
                sink.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(LongString::from("quorum")),
                );
                let own = link.connection.create_channel().await?;
                match own
                    .queue_declare(short(delay::SINK_QUEUE)?, durable_queue(), sink)
                    .await
                {
                    Ok(_) => {
                        let _ = own.close(200, "declared".into()).await;
                    }
                    Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                        tracing::warn!(
                            queue = delay::SINK_QUEUE,
                            "the delay sink is a classic queue (an older version declared it); \
                             in a cluster it stalls delayed deliveries while its node is down: \
                             delete it (`rabbitmqctl delete_queue tq.delay.sink`) and it is \
                             declared again as a quorum queue"
                        );
                    }
                    Err(e) => return Err(e.into()),
                }
                ch.queue_bind(
                    short(delay::SINK_QUEUE)?,
                    short(DELIVER_EXCHANGE)?,
                    short("#")?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
                for level in 0..LEVELS {
                    topic(delay::level_name(level)).await?;
                }
                for level in 0..LEVELS {
                    let name = delay::level_name(level);
                    let mut args = FieldTable::default();
                    args.insert(
                        "x-queue-type".into(),
                        AMQPValue::LongString(LongString::from("quorum")),
                    );
                    args.insert(
                        "x-message-ttl".into(),
                        AMQPValue::LongLongInt(1000i64 << level),
                    );
                    args.insert(
                        "x-dead-letter-exchange".into(),
                        AMQPValue::LongString(LongString::from(
                            delay::next_exchange(level).as_str(),
                        )),
                    );
                    args.insert(
                        "x-dead-letter-strategy".into(),
                        AMQPValue::LongString(LongString::from("at-least-once")),
                    );
                    args.insert(
                        "x-overflow".into(),
                        AMQPValue::LongString(LongString::from("reject-publish")),
                    );
                    ch.queue_declare(short(&name)?, durable_queue(), args)
                        .await?;
                    let (wait, pass) = delay::level_patterns(level);
                    ch.queue_bind(
                        short(&name)?,
                        short(&name)?,
                        short(&wait)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                    ch.exchange_bind(
                        short(&delay::next_exchange(level))?,
                        short(&name)?,
                        short(&pass)?,
                        ExchangeBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                }
                let _ = ch.close(200, "declared".into()).await;
                Ok::<(), Error>(())
            })
            .await
            .map(|_| ())
    }

    /// Publishes `message`, stamped (AMQP `timestamp`, Unix seconds) with when it becomes
    /// deliverable, `ready_at`: the broker's management API reports the head message's stamp,
    /// from which the monitor computes a queue's oldest-message age.
    async fn publish_on(
        link: &Link,
        exchange: &str,
        routing_key: &str,
        message: &RawMessage,
        queue: &str,
        ready_at: u64,
    ) -> Result<()> {
        let what = || {
            let via = if exchange.is_empty() {
                String::new()
            } else {
                format!(" via exchange `{exchange}`")
            };
            format!(
                "the publish of a {}-byte message to queue `{queue}`{via}",
                message.body.len()
            )
        };
        let shared = link.publisher().await?;
        let attempt = |channel| {
            Self::publish_with(
                channel,
                exchange,
                routing_key,
                message,
                ready_at,
                queue,
                &what,
            )
        };
        match attempt(&shared).await {
            Err(Error::Refused { .. }) if link.healthy() => {
                let own = link.connection.create_channel().await?;
                own.confirm_select(ConfirmSelectOptions::default()).await?;
                let result = attempt(&own).await;
                if own.status().connected() {
                    let _ = own.close(200, "published".into()).await;
                }
                result
            }
            // Another publish's nack closed the shared channel under this one (below): not
            // confirmed, so retried on the next channel.
            Err(e) if !shared.status().connected() && link.healthy() => Err(Error::NotConfirmed {
                queue: queue.to_owned(),
                reason: format!("its channel closed before the confirm ({e})"),
            }),
            result => result,
        }
    }

    async fn publish_with(
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        message: &RawMessage,
        ready_at: u64,
        queue: &str,
        what: &impl Fn() -> String,
    ) -> Result<()> {
        // Built per attempt and handed to lapin, rather than built once and cloned for each
        // publish: the header table is most of a message's properties.
        let props = basic_properties(message)?.with_timestamp(ready_at);
        let confirm = channel
            .basic_publish(
                short(exchange)?,
                short(routing_key)?,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.body,
                props,
            )
            .await
            .map_err(refusal(what))?
            .await
            .map_err(refusal(what))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::NotConfirmed {
                queue: queue.to_owned(),
                reason: format!(
                    "unroutable ({} {})",
                    returned.reply_code, returned.reply_text
                ),
            }),
            Confirmation::Nack(_) => {
                // A quorum queue whose leader was lost nacks through the channel that knew the
                // old leader; the next publish opens a fresh channel, which finds the new one.
                let _ = channel.close(200, "replaced after a nack".into()).await;
                Err(Error::NotConfirmed {
                    queue: queue.to_owned(),
                    reason: "the broker refused it (nack)".into(),
                })
            }
        }
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Headers RabbitMQ writes when it dead-letters a message. A message published again (a retry, a
/// deferral, a dead letter) is a new message and must not carry them: RabbitMQ reads `x-death`
/// to detect dead-letter cycles, and a message that already expired out of a delay level once
/// would be taken for a cycle when it reaches that level again. A quorum queue's at-least-once
/// dead-lettering then never forwards it, and it stays in the level for good, holding one of the
/// level's few in-flight dead-letter slots.
fn is_broker_death_header(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

fn basic_properties(m: &RawMessage) -> Result<BasicProperties> {
    let p = &m.properties;
    let headers = if m.headers.keys().any(|k| is_broker_death_header(k)) {
        let mut own = m.headers.clone();
        own.retain(|k, _| !is_broker_death_header(k));
        json_to_table(&own)?
    } else {
        json_to_table(&m.headers)?
    };
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(p.delivery_mode.unwrap_or(2));
    if let Some(v) = &p.content_type {
        props = props.with_content_type(short(v)?);
    }
    if let Some(v) = &p.content_encoding {
        props = props.with_content_encoding(short(v)?);
    }
    if let Some(v) = &p.correlation_id {
        props = props.with_correlation_id(short(v)?);
    }
    if let Some(v) = &p.reply_to {
        props = props.with_reply_to(short(v)?);
    }
    if let Some(v) = p.priority {
        props = props.with_priority(v);
    }
    if let Some(v) = &p.expiration {
        props = props.with_expiration(short(v)?);
    }
    Ok(props)
}

fn raw_message(d: &lapin::message::Delivery) -> RawMessage {
    let p = &d.properties;
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    RawMessage {
        headers: p.headers().as_ref().map(table_to_json).unwrap_or_default(),
        properties: Properties {
            content_type: s(p.content_type()),
            content_encoding: s(p.content_encoding()),
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            priority: *p.priority(),
            delivery_mode: *p.delivery_mode(),
            expiration: s(p.expiration()),
        },
        body: d.data.clone(),
    }
}

impl AmqpBroker {
    /// Publishes to a reply queue the caller declared itself (`reply_to`, Celery's `rpc://`
    /// backend): through the default exchange, declaring nothing, since that queue's arguments
    /// (auto-delete, its expiry) are the caller's. `Ok(false)` if no such queue exists any more
    /// (the caller is gone): there is no one left to tell.
    pub async fn publish_reply(&self, reply_to: &str, message: &RawMessage) -> Result<bool> {
        // Unroutable is an answer, not a failure to retry: the queue is gone for good.
        self.retrying("reply", |link| async move {
            match Self::publish_on(&link, "", reply_to, message, reply_to, unix_seconds()).await {
                Ok(()) => Ok(true),
                Err(Error::NotConfirmed { reason, .. }) if reason.starts_with("unroutable") => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }
}

impl Broker for AmqpBroker {
    async fn publish(&self, queue: &str, message: &RawMessage) -> Result<()> {
        self.retrying("publish", |link| async move {
            self.ensure_task_queue(&link, queue).await?;
            Self::publish_on(&link, "", queue, message, queue, unix_seconds()).await
        })
        .await
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: &RawMessage,
        delay: Duration,
    ) -> Result<()> {
        let seconds = delay.min(delay::MAX_DELAY).as_secs();
        if seconds == 0 {
            return self.publish(queue, message).await;
        }
        let key = delay::routing_key(seconds, queue);
        if key.len() > 255 {
            return Err(Error::Broker(format!(
                "queue name `{queue}` is too long for delayed delivery (at most {} bytes)",
                255 - 2 * LEVELS
            )));
        }
        let mut message = message.clone();
        // The expiry header still applies; a per-message TTL would dead-letter it early instead.
        message.properties.expiration = None;
        let message = &message;
        let key = &key;
        self.retrying("delayed publish", |link| async move {
            self.ensure_delay_topology(&link).await?;
            self.ensure_task_queue(&link, queue).await?;
            // Stamped with when it becomes due: the delay queues keep the stamp, so in the task
            // queue its age counts from then, not from the publish.
            let due = unix_seconds() + seconds;
            Self::publish_on(&link, &delay::entry_exchange(), key, message, queue, due).await
        })
        .await
    }

    async fn dead_letter(&self, queue: &str, message: &RawMessage, reason: &str) -> Result<()> {
        let dlq = dead_letter_queue(queue);
        let message = with_dead_letter_headers(message, queue, reason);
        let (dlq, message) = (&dlq, &message);
        self.retrying("dead-letter publish", |link| async move {
            self.ensure_plain_queue(&link, dlq, self.queues.queue_type(queue))
                .await?;
            Self::publish_on(&link, "", dlq, message, dlq, unix_seconds()).await
        })
        .await
    }

    async fn consume(&self, queues: &[String], prefetch: u16) -> Result<Consumer> {
        if queues.is_empty() {
            return Err(Error::Broker("no queue to consume from".into()));
        }
        // Fail fast on a bad queue name or an unreachable broker.
        let link = self.link(Role::Consume).await?;
        for q in queues {
            self.ensure_task_queue(&link, q).await?;
        }
        let broker = self.clone();
        let queues = queues.to_vec();
        Ok(Consumer::new(
            usize::from(prefetch.max(1)),
            move |tx, stop| tokio::spawn(consume_loop(broker, queues, prefetch.max(1), tx, stop)),
        ))
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        let name = short(queue)?;
        self.retrying("queue length", |link| {
            let name = name.clone();
            async move {
                let ch = link.connection.create_channel().await?;
                let opts = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                match ch.queue_declare(name, opts, FieldTable::default()).await {
                    Ok(q) => {
                        let _ = ch.close(200, "ok".into()).await;
                        Ok(u64::from(q.message_count()))
                    }
                    Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => Ok(0),
                    Err(e) => Err(refusal(|| format!("reading the length of queue `{queue}`"))(e)),
                }
            }
        })
        .await
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let name = short(queue)?;
        self.retrying("queue delete", |link| {
            let name = name.clone();
            async move {
                let ch = link.connection.create_channel().await?;
                ch.queue_delete(name.clone(), QueueDeleteOptions::default())
                    .await
                    .map_err(refusal(|| format!("deleting queue `{queue}`")))?;
                let _ = ch.exchange_delete(name, Default::default()).await;
                let _ = ch.close(200, "ok".into()).await;
                link.declared.lock().expect("declared lock").remove(queue);
                Ok(())
            }
        })
        .await?;
        if let Some(link) = self.inner.consume.lock().await.as_ref() {
            link.declared.lock().expect("declared lock").remove(queue);
        }
        Ok(())
    }
}

/// Keeps a consumer alive across reconnects until told to stop or the receiver goes away.
async fn consume_loop(
    broker: AmqpBroker,
    queues: Vec<String>,
    prefetch: u16,
    tx: tokio::sync::mpsc::Sender<Delivery>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let tag_base = format!("{}-{}", crate::hostname(), uuid::Uuid::new_v4().simple());
    loop {
        if *stop.borrow() {
            return;
        }
        match consume_session(&broker, &queues, prefetch, &tag_base, &tx, &mut stop).await {
            Ok(SessionEnd::Stopped) => return,
            Ok(SessionEnd::Lost) => backoff = Duration::from_millis(100),
            Err(Error::Shutdown) => return,
            Err(e) => tracing::warn!(error = %e, "consumer cannot start; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum SessionEnd {
    Stopped,
    Lost,
}

async fn consume_session(
    broker: &AmqpBroker,
    queues: &[String],
    prefetch: u16,
    tag_base: &str,
    tx: &tokio::sync::mpsc::Sender<Delivery>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<SessionEnd> {
    let link = broker.link(Role::Consume).await?;
    let ch = link.connection.create_channel().await?;
    // Channel-wide: one prefetch window shared by the consumers of every queue on this channel.
    // For one queue a per-consumer window is the same thing, and quorum queues only take that.
    let global = broker.qos == QosScope::Channel
        && queues.len() > 1
        && !broker.inner.per_consumer_forced.load(Ordering::SeqCst)
        && queues
            .iter()
            .all(|q| broker.queues.queue_type(q) == QueueType::Classic);
    ch.basic_qos(prefetch, BasicQosOptions { global }).await?;
    let mut streams = Vec::with_capacity(queues.len());
    let mut tags = Vec::with_capacity(queues.len());
    for (i, queue) in queues.iter().enumerate() {
        broker.ensure_task_queue(&link, queue).await?;
        if broker.queues.queue_type(queue) == QueueType::Quorum {
            broker.bind_celery_delayed(&link, queue).await;
        }
        // The queue's name makes the tag readable in the management UI, when it fits in 255 bytes.
        let mut tag = format!("{tag_base}-{queue}");
        if tag.len() > 255 {
            tag = format!("{tag_base}-{i}");
        }
        let consumer = match ch
            .basic_consume(
                short(queue)?,
                short(&tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) if global && hard_error(&e) == Some(AMQPHardError::NOTIMPLEMENTED) => {
                tracing::warn!(
                    queue,
                    "RabbitMQ refused a channel-wide prefetch window (a quorum queue?); \
                     using per-consumer windows from now on"
                );
                broker
                    .inner
                    .per_consumer_forced
                    .store(true, Ordering::SeqCst);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let queue = queue.clone();
        streams.push(consumer.map(move |d| (queue.clone(), d)).boxed());
        tags.push(tag);
    }
    // Deliveries are settled through the settler, which keeps the channel open until the last one
    // is settled: closing it earlier would requeue messages whose tasks already ran.
    let (settler, settling) = Settler::start(ch.clone(), prefetch);
    {
        let mut settlers = broker.inner.settlers.lock().expect("settlers lock");
        settlers.retain(|t| !t.is_finished());
        settlers.push(settling);
    }
    tracing::info!(queues = ?queues, prefetch, generation = link.generation, "consuming");
    let mut merged = futures_util::stream::select_all(streams);
    loop {
        let item = tokio::select! {
            _ = stop.changed() => None,
            item = merged.next() => Some(item),
        };
        let delivery = match item {
            None => break,
            Some(Some((queue, Ok(d)))) => Delivery {
                message: raw_message(&d),
                queue,
                redelivered: d.redelivered,
                acker: Acker::Amqp(settler.acker(d.delivery_tag)),
            },
            Some(Some((_, Err(e)))) => {
                tracing::warn!(error = %e, "consumer lost its channel");
                return Ok(SessionEnd::Lost);
            }
            Some(None) => {
                tracing::warn!(
                    "consumer stream ended (broker cancelled it or the connection closed)"
                );
                return Ok(SessionEnd::Lost);
            }
        };
        // A closed receiver (the consumer was cancelled) drops the delivery, which requeues it.
        if tx.send(delivery).await.is_err() {
            break;
        }
    }
    for tag in &tags {
        let _ = ch
            .basic_cancel(short(tag)?, BasicCancelOptions::default())
            .await;
    }
    // Give back what arrived before the cancel took effect.
    while let Ok(Some((_, Ok(d)))) =
        tokio::time::timeout(Duration::from_millis(200), merged.next()).await
    {
        let _ = d
            .acker
            .reject(lapin::options::BasicRejectOptions { requeue: true })
            .await;
    }
    Ok(SessionEnd::Stopped)
}

/// The largest frame this client proposes unless the URL says otherwise (`?frame_max=N`, which
/// lapin reads as Celery's py-amqp does). lapin keeps a send and a receive buffer of 32 frames per
/// connection, filled at once: with RabbitMQ's 128 KiB default that is 8 MiB for each of a
/// process's two connections; at 16 KiB it is 1 MiB. Bigger messages are sent in more frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

fn with_default_frame_max(uri: &str) -> String {
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|p| p.starts_with("frame_max=")) {
        return uri.to_owned();
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}frame_max={DEFAULT_FRAME_MAX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_max_is_proposed_unless_the_url_sets_it() {
        assert_eq!(
            with_default_frame_max("amqp://g:g@h:5672/%2f"),
            "amqp://g:g@h:5672/%2f?frame_max=16384"
        );
        assert_eq!(
            with_default_frame_max("amqps://h/v?heartbeat=10"),
            "amqps://h/v?heartbeat=10&frame_max=16384"
        );
        assert_eq!(
            with_default_frame_max("amqp://h/v?frame_max=131072"),
            "amqp://h/v?frame_max=131072"
        );
    }
}
