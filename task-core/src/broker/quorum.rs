//! Quorum task queues, and Celery's own delay topology for them.
//!
//! Which type a task queue is declared with is a deployment decision that every process must
//! share (a client that publishes first declares the queue, and a queue cannot change type), so it
//! comes from the environment every process reads, as Celery's `task_default_queue_type` comes from
//! the configuration every Celery process loads:
//!
//! | variable | values | meaning |
//! |---|---|---|
//! | `BROKER_QUEUE_TYPE` | `classic` (default) or `quorum` | the type of every task queue declared |
//! | `BROKER_QUORUM_QUEUES` | comma-separated names | queues declared quorum whatever the default |
//! | `BROKER_DELIVERY_LIMIT` | a count ≥ 1 | `x-delivery-limit` of quorum queues: a message redelivered that often is dropped (poison) |
//!
//! A queue that exists already is used as it is, whatever these say. Consuming a quorum queue
//! needs a per-consumer prefetch window; the broker switches to one on its own for them.
//!
//! Celery 5.5+ sends a countdown for a quorum queue behind a topic exchange through its "native
//! delayed delivery": exchange `celery_delayed_27`, 28 levels of quorum queues `celery_delayed_L`
//! (TTL 2^L s, dead-lettered at least once to level L-1, level 0 to `celery_delayed_delivery`),
//! routing key = the delay in 28 binary words, then the routing key. A Rust worker consuming a
//! quorum queue declares that topology as kombu does (same arguments, so either side may come first)
//! and binds the queue to `celery_delayed_delivery` with 28 single-word wildcards and its name, so
//! such a countdown reaches it when no Python worker runs.

use std::collections::BTreeSet;

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::field_table::short;
use crate::error::{Error, Result};

/// How a task queue is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A classic durable queue (Celery's default).
    #[default]
    Classic,
    /// A replicated quorum queue (`x-queue-type: quorum`).
    Quorum,
}

/// The declaration settings of task queues (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    default: QueueType,
    quorum: BTreeSet<String>,
    delivery_limit: Option<u32>,
}

impl QueueOptions {
    /// Every queue classic: what a plain Celery deployment declares.
    pub fn classic() -> Self {
        Self::default()
    }

    /// Every queue quorum.
    pub fn quorum() -> Self {
        QueueOptions {
            default: QueueType::Quorum,
            ..Self::default()
        }
    }

    /// `queue` quorum whatever the default.
    pub fn with_quorum_queue(mut self, queue: &str) -> Self {
        self.quorum.insert(queue.to_owned());
        self
    }

    /// The `x-delivery-limit` of quorum queues.
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// Reads `BROKER_QUEUE_TYPE`, `BROKER_QUORUM_QUEUES` and `BROKER_DELIVERY_LIMIT`.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self::parse(
            var("BROKER_QUEUE_TYPE").as_deref(),
            var("BROKER_QUORUM_QUEUES").as_deref(),
            var("BROKER_DELIVERY_LIMIT").as_deref(),
        )
    }

    /// Parses the three settings' values (absent ones take their defaults).
    pub fn parse(
        queue_type: Option<&str>,
        quorum_queues: Option<&str>,
        delivery_limit: Option<&str>,
    ) -> Result<Self> {
        let default = match queue_type.map(str::trim) {
            None | Some("classic") => QueueType::Classic,
            Some("quorum") => QueueType::Quorum,
            Some(other) => {
                return Err(Error::Config(format!(
                    "BROKER_QUEUE_TYPE: `{other}` is neither classic nor quorum"
                )));
            }
        };
        let mut quorum = BTreeSet::new();
        for name in quorum_queues.unwrap_or_default().split(',') {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            short(name).map_err(|_| {
                Error::Config(format!(
                    "BROKER_QUORUM_QUEUES: `{name}` is longer than 255 bytes"
                ))
            })?;
            quorum.insert(name.to_owned());
        }
        let delivery_limit = match delivery_limit.map(str::trim) {
            None => None,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    return Err(Error::Config(format!(
                        "BROKER_DELIVERY_LIMIT: `{v}` is not a count of at least 1"
                    )));
                }
            },
        };
        Ok(QueueOptions {
            default,
            quorum,
            delivery_limit,
        })
    }

    /// The type `queue` is declared with.
    pub fn queue_type(&self, queue: &str) -> QueueType {
        if self.quorum.contains(queue) {
            QueueType::Quorum
        } else {
            self.default
        }
    }

    /// The arguments a task queue (or its dead-letter queue, which follows its type) is declared
    /// with.
    pub(super) fn declare_args(&self, kind: QueueType) -> FieldTable {
        let mut args = FieldTable::default();
        if kind == QueueType::Quorum {
            args.insert("x-queue-type".into(), string("quorum"));
            if let Some(limit) = self.delivery_limit {
                args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit as i32));
            }
        }
        args
    }
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Levels of Celery's native delayed delivery (kombu's `MAX_NUMBER_OF_BITS_TO_USE`).
pub(super) const CELERY_LEVELS: u32 = 28;

/// Where Celery's delay levels hand messages to their queues.
pub(super) const CELERY_DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

fn celery_level(level: u32) -> String {
    format!("celery_delayed_{level}")
}

/// The pattern binding `queue` to [`CELERY_DELIVERY_EXCHANGE`]: exactly the 28 delay words and the
/// queue's name (kombu binds `#.<name>`, which also matches a longer name ending in `.<name>`).
pub(super) fn celery_delivery_pattern(queue: &str) -> String {
    format!("{}{queue}", "*.".repeat(CELERY_LEVELS as usize))
}

/// A TTL argument typed as py-amqp types a Python int: 32-bit signed while it fits.
fn ttl_value(ms: i64) -> AMQPValue {
    match i32::try_from(ms) {
        Ok(v) => AMQPValue::LongInt(v),
        Err(_) => AMQPValue::LongLongInt(ms),
    }
}

/// Declares Celery's delay levels on `ch`, with kombu's names, arguments and bindings. A level that
/// exists already with other arguments (declared by another version) closes the channel: the
/// caller treats the whole as best effort.
pub(super) async fn declare_celery_delayed(ch: &Channel) -> Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for level in (0..CELERY_LEVELS).rev() {
        let name = celery_level(level);
        ch.exchange_declare(
            short(&name)?,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        let next = if level == 0 {
            CELERY_DELIVERY_EXCHANGE.to_owned()
        } else {
            celery_level(level - 1)
        };
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("quorum"));
        args.insert("x-overflow".into(), string("reject-publish"));
        args.insert("x-message-ttl".into(), ttl_value(1000i64 << level));
        args.insert("x-dead-letter-exchange".into(), string(&next));
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        ch.queue_declare(short(&name)?, queue_opts, args).await?;
        let skip = "*.".repeat((CELERY_LEVELS - 1 - level) as usize);
        ch.queue_bind(
            short(&name)?,
            short(&name)?,
            short(&format!("{skip}1.#"))?,
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.exchange_declare(
        short(CELERY_DELIVERY_EXCHANGE)?,
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    for level in (0..CELERY_LEVELS).rev() {
        let next = if level == 0 {
            CELERY_DELIVERY_EXCHANGE.to_owned()
        } else {
            celery_level(level - 1)
        };
        let skip = "*.".repeat((CELERY_LEVELS - 1 - level) as usize);
        ch.exchange_bind(
            short(&next)?,
            short(&celery_level(level))?,
            short(&format!("{skip}0.#"))?,
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_name_their_variable() {
        let o = QueueOptions::parse(None, None, None).unwrap();
        assert_eq!(o, QueueOptions::classic());
        assert_eq!(o.queue_type("celery"), QueueType::Classic);

        let o = QueueOptions::parse(Some("classic"), Some("billing, ledger ,"), Some("5")).unwrap();
        assert_eq!(o.queue_type("billing"), QueueType::Quorum);
        assert_eq!(o.queue_type("ledger"), QueueType::Quorum);
        assert_eq!(o.queue_type("celery"), QueueType::Classic);
        let args = o.declare_args(QueueType::Quorum);
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(5))
        );
        assert!(o.declare_args(QueueType::Classic).inner().is_empty());

        let o = QueueOptions::parse(Some("quorum"), None, None).unwrap();
        assert_eq!(o.queue_type("anything"), QueueType::Quorum);

        for (t, q, l, var) in [
            (Some("stream"), None, None, "BROKER_QUEUE_TYPE"),
            (None, None, Some("0"), "BROKER_DELIVERY_LIMIT"),
            (None, None, Some("many"), "BROKER_DELIVERY_LIMIT"),
        ] {
            let e = QueueOptions::parse(t, q, l).unwrap_err().to_string();
            assert!(e.contains(var), "{e}");
        }
        let long = "q".repeat(256);
        let e = QueueOptions::parse(None, Some(&long), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BROKER_QUORUM_QUEUES"), "{e}");
    }

    #[test]
    fn celery_patterns_follow_kombu() {
        let p = celery_delivery_pattern("billing");
        assert_eq!(p.split('.').count(), 29);
        assert!(p.ends_with("*.billing"));
        // kombu's routing key for a 5 s countdown: 28 binary words, then the routing key.
        let key = format!(
            "{}.billing",
            format!("{:028b}", 5)
                .chars()
                .map(String::from)
                .collect::<Vec<_>>()
                .join(".")
        );
        let words: Vec<&str> = key.split('.').collect();
        let pattern: Vec<&str> = p.split('.').collect();
        assert_eq!(words.len(), pattern.len());
        assert!(words.iter().zip(&pattern).all(|(w, p)| *p == "*" || p == w));
        assert_eq!(ttl_value(1000), AMQPValue::LongInt(1000));
        assert_eq!(
            ttl_value(1000i64 << 27),
            AMQPValue::LongLongInt(134_217_728_000)
        );
    }
}
