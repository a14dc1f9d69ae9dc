//! Remote control over kombu's "pidbox" mailbox, as `celery inspect`, `celery control` and Flower
//! use it (reference `celery-protocol.md` §4.4).
//!
//! - Requests are broadcast on the fanout exchange `celery.pidbox`; each node consumes its own
//!   queue `<nodename>.celery.pidbox` (exclusive, auto-delete, `x-expires` 10 s, `x-message-ttl`
//!   300 s, as Celery declares it) without acknowledgements.
//! - A request is `{method, arguments, destination, pattern, matcher, ticket, reply_to}`; a node
//!   answers only when `destination` (a list of node names) or `pattern` names it, and ignores a
//!   request whose `expires` header has passed.
//! - A reply goes to the direct exchange `reply.celery.pidbox` with the client's routing key, the
//!   request's `ticket` and the node's Lamport `clock` in the headers, as `{"<node>": reply}`.
//!
//! The worker's commands live in `worker::control`; this module is the transport, plus a small
//! client ([`broadcast`]) for probing node names and for tests.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Map, Value, json};

use crate::broker::AmqpBroker;
use crate::broker::field_table::{json_to_table, short, table_to_json};
use crate::error::{Error, Result};
use crate::events::LamportClock;
use crate::protocol::{ContentType, decode_value};

/// The broadcast exchange.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
/// The reply exchange.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// A node's mailbox queue.
pub fn node_queue(hostname: &str) -> String {
    format!("{hostname}.celery.pidbox")
}

/// One decoded control request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command (`ping`, `stats`, `revoke`, …).
    pub method: String,
    /// Its arguments.
    pub arguments: Map<String, Value>,
    /// Node names it is for (`None` = every node).
    pub destination: Option<Vec<String>>,
    /// A glob or regular expression over node names, with `matcher`.
    pub pattern: Option<String>,
    /// `glob` or `pcre`.
    pub matcher: Option<String>,
    /// Reply ticket; `None` for fire-and-forget casts.
    pub ticket: Option<String>,
    /// Where to reply: `(exchange, routing_key)`.
    pub reply_to: Option<(String, String)>,
    /// Unix time after which the request is stale.
    pub expires: Option<f64>,
    /// The sender's Lamport clock.
    pub clock: Option<u64>,
}

impl Request {
    /// Decodes a request from a pidbox message body and headers.
    pub fn decode(
        content_type: Option<&str>,
        headers: &Map<String, Value>,
        body: &[u8],
    ) -> Result<Self> {
        let ct = ContentType::from_mime(content_type)?;
        let v = decode_value(ct, body)?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Broker("a control request must be an object".into()))?;
        let method = obj
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Broker("a control request needs a `method`".into()))?
            .to_owned();
        let arguments = obj
            .get("arguments")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let destination = match obj.get("destination") {
            Some(Value::Array(names)) => Some(
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            ),
            Some(Value::String(name)) => Some(vec![name.clone()]),
            _ => None,
        };
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        let reply_to = obj.get("reply_to").and_then(|r| {
            Some((
                r.get("exchange")?.as_str()?.to_owned(),
                r.get("routing_key")?.as_str()?.to_owned(),
            ))
        });
        let number = |k: &str| headers.get(k).and_then(Value::as_f64);
        Ok(Request {
            method,
            arguments,
            destination,
            pattern: text("pattern"),
            matcher: text("matcher"),
            ticket: text("ticket"),
            reply_to,
            expires: number("expires").filter(|e| *e > 0.0),
            clock: number("clock").map(|c| c as u64),
        })
    }

    /// Whether the request is addressed to `hostname`.
    pub fn is_for(&self, hostname: &str) -> bool {
        if let Some(names) = &self.destination
            && !names.is_empty()
        {
            return names.iter().any(|n| n == hostname);
        }
        match (&self.pattern, self.matcher.as_deref()) {
            (Some(p), Some("pcre")) => p == hostname,
            (Some(p), _) => glob(p, hostname),
            (None, _) => true,
        }
    }

    /// Whether the request is past its `expires` time.
    pub fn is_expired(&self, now: f64) -> bool {
        self.expires.is_some_and(|e| e < now)
    }
}

/// Shell-style matching with `*` and `?` (kombu's default `glob` matcher).
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

/// What answers commands: `None` means the command is unknown.
pub trait Handler: Send + Sync + 'static {
    /// Runs `method` and returns the reply body for this node.
    fn handle(&self, request: Request) -> BoxFuture<'_, Value>;
}

/// Serves `hostname`'s mailbox until `stop` resolves, reconnecting after broker failures.
/// `ready` is told once the mailbox first consumes.
pub async fn serve(
    broker: AmqpBroker,
    hostname: String,
    clock: Arc<LamportClock>,
    handler: Arc<dyn Handler>,
    stop: impl std::future::Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    tokio::pin!(stop);
    let mut ready = ready;
    let mut backoff = Duration::from_millis(200);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = session(&broker, &hostname, &clock, &handler, &mut ready) => match r {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(Error::Shutdown) => return,
                // Another process of the same node name holds the exclusive mailbox.
                Err(e) if { let t = e.to_string(); t.contains("RESOURCE_LOCKED") || t.contains("RESOURCELOCKED") } => {
                    if !warned {
                        tracing::warn!(
                            hostname,
                            "another node named {hostname} holds its mailbox; this worker answers \
                             no remote control until it goes (give each worker its own name)"
                        );
                        warned = true;
                    }
                    backoff = Duration::from_secs(5);
                }
                Err(e) => tracing::warn!(error = %e, "remote control unavailable; retrying in {backoff:?}"),
            },
        }
        // Whoever waits for the mailbox is not kept waiting by one that cannot be had now.
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn transient_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: false,
        ..ExchangeDeclareOptions::default()
    }
}

/// A channel with the broadcast exchange (and, for whoever replies or collects replies, the reply
/// exchange) declared as kombu declares them.
async fn mailbox_channel(broker: &AmqpBroker, replies: bool) -> Result<lapin::Channel> {
    let (ch, _) = broker.open_channel().await?;
    ch.exchange_declare(
        PIDBOX_EXCHANGE.into(),
        ExchangeKind::Fanout,
        transient_exchange(),
        FieldTable::default(),
    )
    .await?;
    if replies {
        ch.exchange_declare(
            REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            transient_exchange(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(ch)
}

async fn session(
    broker: &AmqpBroker,
    hostname: &str,
    clock: &Arc<LamportClock>,
    handler: &Arc<dyn Handler>,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<()> {
    let ch = mailbox_channel(broker, true).await?;
    let queue = node_queue(hostname);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(10_000));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(300_000));
    ch.queue_declare(
        short(&queue)?,
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        short(&queue)?,
        PIDBOX_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            short(&queue)?,
            short(&format!("pidbox-{}", uuid::Uuid::new_v4().simple()))?,
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    tracing::debug!(queue, "remote control ready");
    if let Some(tx) = ready.take() {
        let _ = tx.send(());
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(table_to_json)
            .unwrap_or_default();
        let ct = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str().to_owned());
        let request = match Request::decode(ct.as_deref(), &headers, &delivery.data) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed control request");
                continue;
            }
        };
        if let Some(c) = request.clock {
            clock.adjust(c);
        }
        if !request.is_for(hostname) {
            continue;
        }
        if request.is_expired(crate::events::unix_now()) {
            tracing::debug!(
                method = request.method,
                "ignoring an expired control request"
            );
            continue;
        }
        let method = request.method.clone();
        let ticket = request.ticket.clone();
        let reply_to = request.reply_to.clone();
        tracing::debug!(method, "control request");
        let reply = handler.handle(request).await;
        if let (Some(ticket), Some((exchange, key))) = (ticket, reply_to) {
            let mut body = Map::new();
            body.insert(hostname.to_owned(), reply);
            let mut headers = Map::new();
            headers.insert("ticket".into(), ticket.into());
            headers.insert("clock".into(), json!(clock.forward()));
            if let Err(e) = publish(&ch, &exchange, &key, &Value::Object(body), &headers).await {
                tracing::warn!(error = %e, method, "could not send a control reply");
            }
        }
    }
    Err(Error::Broker("the remote-control consumer ended".into()))
}

async fn publish(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &Value,
    headers: &Map<String, Value>,
) -> Result<()> {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(1)
        .with_headers(json_to_table(headers)?);
    // Not a confirm channel: the confirmation resolves at once, as `NotRequested`.
    ch.basic_publish(
        short(exchange)?,
        short(routing_key)?,
        BasicPublishOptions::default(),
        &serde_json::to_vec(body)?,
        props,
    )
    .await?
    .await?;
    Ok(())
}

/// Broadcasts `method` without waiting for replies (kombu's `cast`).
pub async fn cast(
    broker: &AmqpBroker,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
) -> Result<()> {
    let ch = mailbox_channel(broker, false).await?;
    let body = json!({
        "method": method,
        "arguments": arguments,
        "destination": destination,
        "pattern": null,
        "matcher": null,
    });
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(1));
    headers.insert("expires".into(), json!(0));
    publish(&ch, PIDBOX_EXCHANGE, "", &body, &headers).await?;
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

/// Broadcasts `method` and collects replies for `timeout` (or until `limit` nodes answered):
/// `(node, reply)` pairs. What `celery inspect`/`control` does, for probing and tests.
pub async fn broadcast(
    broker: &AmqpBroker,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
    limit: Option<usize>,
) -> Result<Vec<(String, Value)>> {
    let ch = mailbox_channel(broker, true).await?;
    let oid = uuid::Uuid::new_v4().to_string();
    let queue = format!("{oid}.reply.celery.pidbox");
    ch.queue_declare(
        short(&queue)?,
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        short(&queue)?,
        REPLY_EXCHANGE.into(),
        short(&oid)?,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            short(&queue)?,
            short(&format!("reply-{oid}"))?,
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let ticket = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "method": method,
        "arguments": arguments,
        "destination": destination,
        "pattern": null,
        "matcher": null,
        "ticket": ticket,
        "reply_to": {"exchange": REPLY_EXCHANGE, "routing_key": oid},
    });
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(1));
    headers.insert(
        "expires".into(),
        json!(crate::events::unix_now() + timeout.as_secs_f64()),
    );
    publish(&ch, PIDBOX_EXCHANGE, "", &body, &headers).await?;
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while limit.is_none_or(|l| replies.len() < l) {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(Ok(d))) = next else { break };
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(table_to_json)
            .unwrap_or_default();
        if headers.get("ticket").and_then(Value::as_str) != Some(ticket.as_str()) {
            continue;
        }
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&d.data) {
            replies.extend(m);
        }
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(replies)
}

/// The node name to run as. Celery warns when another node already answers to a name; an
/// explicitly chosen name (`--hostname`) is kept with that warning, while the default name is
/// made unique per process (`celery-<pid>@host`) so two workers on one host never share a
/// mailbox. `probe` bounds how long peers get to answer.
pub async fn unique_hostname(
    broker: &AmqpBroker,
    name: &str,
    explicit: bool,
    probe: Duration,
) -> String {
    let taken = match broadcast(
        broker,
        "ping",
        json!({}),
        Some(&[name.to_owned()]),
        probe,
        Some(1),
    )
    .await
    {
        Ok(replies) => !replies.is_empty(),
        Err(e) => {
            tracing::debug!(error = %e, "could not probe the node name");
            false
        }
    };
    if !taken {
        return name.to_owned();
    }
    if explicit {
        tracing::warn!(
            hostname = name,
            "a node named {name} is already using this mailbox; replies from the two will be mixed"
        );
        return name.to_owned();
    }
    let (node, host) = name.split_once('@').unwrap_or((name, ""));
    let unique = if host.is_empty() {
        format!("{node}-{}", std::process::id())
    } else {
        format!("{node}-{}@{host}", std::process::id())
    };
    tracing::warn!(
        hostname = name,
        using = unique,
        "a node named {name} is already running; this worker is {unique} (set --hostname to choose)"
    );
    unique
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_as_celery_sends_them() {
        let body =
            br#"{"method": "ping", "arguments": {}, "destination": ["w1@h"], "pattern": null,
            "matcher": null, "ticket": "t-1", "reply_to": {"exchange": "reply.celery.pidbox",
            "routing_key": "oid"}}"#;
        let mut headers = Map::new();
        headers.insert("clock".into(), json!(7));
        headers.insert("expires".into(), json!(100.5));
        let r = Request::decode(Some("application/json"), &headers, body).unwrap();
        assert_eq!(r.method, "ping");
        assert_eq!(r.ticket.as_deref(), Some("t-1"));
        assert_eq!(
            r.reply_to,
            Some(("reply.celery.pidbox".into(), "oid".into()))
        );
        assert_eq!(r.clock, Some(7));
        assert!(r.is_for("w1@h") && !r.is_for("w2@h"));
        assert!(r.is_expired(101.0) && !r.is_expired(100.0));
    }

    #[test]
    fn patterns_select_nodes() {
        let mut r = Request::decode(
            Some("application/json"),
            &Map::new(),
            br#"{"method": "ping"}"#,
        )
        .unwrap();
        assert!(r.is_for("anyone@h"));
        r.pattern = Some("w*@h".into());
        assert!(r.is_for("w12@h") && !r.is_for("x@h"));
    }
}
